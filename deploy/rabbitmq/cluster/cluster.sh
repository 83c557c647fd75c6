#!/usr/bin/env bash
# A private local three-node RabbitMQ cluster (pabxc1..3@localhost, AMQP 5681-5683).
#
#   deploy/rabbitmq/cluster/cluster.sh up     [DIR] [--nodes N] [--base-port P]
#   deploy/rabbitmq/cluster/cluster.sh status [DIR]
#   deploy/rabbitmq/cluster/cluster.sh ctl    [DIR] NODE ARGS...   # e.g. ctl /tmp/pabx-cluster 2 stop_app
#   deploy/rabbitmq/cluster/cluster.sh env    [DIR]                # PABX_WORKER_AMQP_URL for the worker
#   deploy/rabbitmq/cluster/cluster.sh down   [DIR]
#
# DIR defaults to /tmp/pabx-cluster. Never touches rabbit@localhost (see README.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=python3

command=${1:?usage: cluster.sh up|status|ctl|env|down [DIR] ...}
shift
dir=/tmp/pabx-cluster
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ] && ! [[ "$1" =~ ^[0-9]+$ ]]; then
  dir=$1
  shift
fi

cd "$root"
case "$command" in
  up|down|status)
    exec "$python" -m tests.cluster.rabbit_cluster "$command" "$dir" "$@" ;;
  ctl)
    exec "$python" -m tests.cluster.rabbit_cluster ctl "$dir" "$@" ;;
  env)
    urls=$("$python" -c 'import json,sys; print(";".join(n["url"] for n in json.load(open(sys.argv[1]))["nodes"]))' "$dir/cluster.json")
    echo "export PABX_WORKER_AMQP_URL='$urls'" ;;
  *)
    echo "unknown command: $command" >&2
    exit 2 ;;
esac
