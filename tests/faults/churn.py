"""Continuous churn on the master's tree, run INSIDE a container (its source is passed to python3 -c).

    python3 -c "$(cat churn.py)" ROOT SEED MAX_OPS MAX_SECONDS INTERVAL

Creates, edits, appends to, deletes, renames and chmods files, and creates, renames and
removes directories below ROOT, one operation every INTERVAL seconds, until standard input
is closed, MAX_OPS operations are done or MAX_SECONDS have passed; then prints a JSON line
with the count of each operation. Names mix ASCII, Chinese, emoji, spaces, quotes and
``%#?;``. Standard library only: it runs in the dlopbox image.
"""

import json
import os
import random
import shutil
import sys
import threading
import time
from collections import Counter

NAMES = ("f{}.txt", "文件 {}.txt", "e 🙂 {}", "q'u\"o %#?; {}.bin", "data-{}.csv")
OPS = (("create", 30), ("edit", 20), ("append", 8), ("delete", 12), ("rename", 14), ("chmod", 3),
       ("mkdir", 5), ("rename_dir", 3), ("rmdir", 2), ("move_across", 3))


def main(root, seed, max_ops, max_seconds, interval):
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    stop = threading.Event()

    def wait_for_eof():
        while os.read(0, 4096):  # raw reads: a buffered stdin would block interpreter exit
            pass
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    files, dirs = [], [""]
    counter = Counter()
    serial = 0
    choices = [name for name, weight in OPS for _ in range(weight)]

    def fresh(directory, suffix=""):
        nonlocal serial
        serial += 1
        name = rng.choice(NAMES).format(serial)
        if suffix:
            name = name.replace(".", "_") + suffix
        return os.path.join(directory, name) if directory else name

    def content():
        return os.urandom(rng.choice((0, 1, 100, 4096, rng.randrange(1, 64 * 1024))))

    deadline = time.monotonic() + max_seconds
    done = 0
    while done < max_ops and time.monotonic() < deadline and not stop.is_set():
        op = rng.choice(choices)
        if op in ("edit", "append", "delete", "rename", "chmod") and not files:
            op = "create"
        if op in ("rename_dir", "rmdir") and len(dirs) == 1:
            op = "mkdir"
        if op == "create":
            path = fresh(rng.choice(dirs))
            with open(os.path.join(root, path), "wb") as f:
                f.write(content())
            files.append(path)
        elif op == "edit":
            with open(os.path.join(root, rng.choice(files)), "wb") as f:
                f.write(content())
        elif op == "append":
            with open(os.path.join(root, rng.choice(files)), "ab") as f:
                f.write(os.urandom(rng.randrange(1, 2048)))
        elif op == "delete":
            path = files.pop(rng.randrange(len(files)))
            os.unlink(os.path.join(root, path))
        elif op == "rename":
            i = rng.randrange(len(files))
            new = fresh(os.path.dirname(files[i]))
            os.rename(os.path.join(root, files[i]), os.path.join(root, new))
            files[i] = new
        elif op == "move_across":
            if not files:
                continue
            i = rng.randrange(len(files))
            new = fresh(rng.choice(dirs))
            os.rename(os.path.join(root, files[i]), os.path.join(root, new))
            files[i] = new
        elif op == "chmod":
            # World-readable modes only: nginx cannot serve a 0600 file (see the xfail test in test_outages.py).
            os.chmod(os.path.join(root, rng.choice(files)), rng.choice((0o644, 0o755, 0o664, 0o744)))
        elif op == "mkdir":
            path = fresh(rng.choice(dirs), ".d")
            os.mkdir(os.path.join(root, path))
            dirs.append(path)
        elif op == "rename_dir":
            old = rng.choice(dirs[1:])
            parent = os.path.dirname(old)
            new = fresh(parent, ".d")
            os.rename(os.path.join(root, old), os.path.join(root, new))
            rebase = lambda p: new + p[len(old):] if p == old or p.startswith(old + "/") else p  # noqa: E731
            dirs[:] = [rebase(d) for d in dirs]
            files[:] = [rebase(f) for f in files]
        elif op == "rmdir":
            old = rng.choice(dirs[1:])
            shutil.rmtree(os.path.join(root, old))
            inside = lambda p: p == old or p.startswith(old + "/")  # noqa: E731
            dirs[:] = [d for d in dirs if not inside(d)]
            files[:] = [f for f in files if not inside(f)]
        counter[op] += 1
        done += 1
        if interval:
            time.sleep(interval)
    print(json.dumps({"ops": done, "files": len(files), "dirs": len(dirs) - 1, "counts": dict(counter)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
