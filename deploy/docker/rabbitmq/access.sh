#!/bin/sh
# Entry point of the compose RabbitMQ service: writes the access definitions (virtual host
# "/", one user, its permissions) from RABBITMQ_USER and RABBITMQ_PASSWORD (env_file), so no
# password lives in the repository, then starts RabbitMQ (the image's own entry point).
#   DEFINITIONS_DIR  where to write 00-access.json (default /etc/rabbitmq/definitions.d)
# With no arguments it only writes the file.
set -eu
: "${RABBITMQ_USER:?set RABBITMQ_USER in the env_file}"
: "${RABBITMQ_PASSWORD:?set RABBITMQ_PASSWORD in the env_file}"
case "$RABBITMQ_USER$RABBITMQ_PASSWORD" in
  *[\"\\]*) echo "access.sh: RABBITMQ_USER/RABBITMQ_PASSWORD may not contain \" or \\" >&2; exit 2 ;;
esac
dir="${DEFINITIONS_DIR:-/etc/rabbitmq/definitions.d}"
mkdir -p "$dir"
umask 0027
cat > "$dir/00-access.json" <<JSON
{
  "vhosts": [{"name": "/"}],
  "users": [{"name": "$RABBITMQ_USER", "password": "$RABBITMQ_PASSWORD", "tags": ""}],
  "permissions": [
    {"user": "$RABBITMQ_USER", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
  ]
}
JSON
if [ "$#" -gt 0 ]; then
  # The image's entry point runs RabbitMQ as the rabbitmq user, which must read the file.
  chown root:rabbitmq "$dir/00-access.json" 2>/dev/null || chmod 0644 "$dir/00-access.json"
  exec "$@"
fi
