#!/usr/bin/env bash
# On the GPU machine: a job that outlasts one device command (10 min), run in its own process
# session so it survives the command that started it, and collected by a later command.
#   scripts/device_bg.sh start NAME 'CMD'   # returns at once; CMD runs under bash with
#                                           # $JOB_OUT set (a folder for what it keeps)
#   scripts/device_bg.sh wait NAME [SECS]   # waits for the end (at most SECS, default 580),
#                                           # prints the log tail, packs $JOB_OUT and the log
#                                           # into $OUT/NAME.tgz (the device returns 8 files)
# The machine goes back when idle between commands, ending the job: call `wait` again at once.
set -uo pipefail
cd "$(dirname "$0")/.."
op=${1:?start or wait} name=${2:?job name}
dir=/tmp/sglora-bg/$name
case $op in
start)
    rm -rf "$dir" && mkdir -p "$dir/out"
    JOB_OUT=$dir/out setsid nohup bash -c "${3:?command}; echo \$? >$dir/done" \
        </dev/null >"$dir/log" 2>&1 &
    echo "started $name (pid $!), log $dir/log"
    ;;
wait)
    end=$(($(date +%s) + ${3:-580}))
    while [ ! -f "$dir/done" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    [ -f "$dir/done" ] && echo "$name finished: exit $(cat "$dir/done")" || echo "$name still running"
    tail -${TAIL:-60} "$dir/log"
    mkdir -p "${OUT:-/tmp/out}"
    tar -czf "${OUT:-/tmp/out}/$name.tgz" -C "$dir" log out
    ;;
*) echo "unknown op $op" && exit 2 ;;
esac
