"""dlopbox: real-time one-way file synchronisation from one master to many slaves."""

__version__ = "0.1.0"
