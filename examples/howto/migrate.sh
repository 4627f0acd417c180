#!/bin/sh
# Move a device between two processes: docs/howto/migrate.md. Run from the repository's
# root after the set-up of docs/getting-started.md: sh examples/howto/migrate.sh
set -e
# [processes]
PYTHON=${PYTHON:-.venv/bin/python}
DIR=$(mktemp -d)
export PYTHONPATH=examples/howto   # where the device's plugin module (counter.py) is

# the source: serves howto-counter on a device link
$PYTHON -m pcidev.transport.link.process -p counter --device howto-counter --link unix:$DIR/a.sock &
SOURCE=$!
# the destination: waits for the device on a migration socket, then serves it on its own link
$PYTHON -m pcidev.transport.link.process -p counter --device howto-counter --link unix:$DIR/b.sock \
    --incoming unix:$DIR/migration.sock &
DESTINATION=$!
while [ ! -S $DIR/a.sock ] || [ ! -S $DIR/migration.sock ]; do sleep 0.1; done
# the host: plugs the device from the source, moves it to the destination, keeps driving it
$PYTHON examples/howto/migrate.py unix:$DIR/a.sock unix:$DIR/migration.sock
wait $SOURCE               # the source process exits once its device has moved away
kill $DESTINATION          # the destination serves until it is told to stop (SIGTERM)
wait $DESTINATION || true
# [end processes]
rm -rf "$DIR"
