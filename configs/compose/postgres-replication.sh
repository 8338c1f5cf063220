#!/bin/sh
# Run once by the postgres image when it creates its data directory: allow replication connections (the
# optional postgres-standby service of docker-compose.yaml) with the same password check as other clients.
set -e
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
