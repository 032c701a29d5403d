#!/bin/sh
# The image's PID 1: runs the server command it is given and, on `docker stop` (SIGTERM) or Ctrl-C, first
# signals that server's python-backend stubs, so the engine ends every request with "server is shutting
# down", then stops the server (the launcher's order; Triton alone waits out its exit timeout and aborts).
"$@" &
server=$!
drain() {
    pkill -TERM -P "$server" -f triton_python_backend_stub
    sleep 1
    kill -TERM "$server" 2>/dev/null
}
trap drain TERM INT
wait "$server"
status=$?
if kill -0 "$server" 2>/dev/null; then  # a trapped signal cut the wait short: wait for the server's own exit
    wait "$server"
    status=$?
fi
exit "$status"
