#!/bin/sh
# Render every $NGINX_ENVSUBST_TEMPLATE_DIR/**/*.template into $NGINX_ENVSUBST_OUTPUT_DIR,
# replacing only the variables set in the environment, so that nginx's own $uri and
# $host stay as they are: the official image's template mechanism.
set -eu
template_dir=${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}
suffix=${NGINX_ENVSUBST_TEMPLATE_SUFFIX:-.template}
output_dir=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
filter=${NGINX_ENVSUBST_FILTER:-}

[ -d "$template_dir" ] || exit 0
defined=$(env | cut -d= -f1 | grep -E '^[A-Za-z_][A-Za-z0-9_]*$' | grep -E -- "${filter:-.}" \
          | sed 's/.*/${&}/' | tr '\n' ' ')
find "$template_dir" -follow -type f -name "*$suffix" | while read -r template; do
    relative=${template#"$template_dir"/}
    output=$output_dir/${relative%"$suffix"}
    mkdir -p "$(dirname "$output")"
    envsubst "$defined" < "$template" > "$output"
    echo "$0: rendered $template to $output"
done
