#!/usr/bin/env bash
# Start mock LLM (if not running) and the OpenClaw gateway in the background; wait until ready.
set -u
cd /tmp/openclaw-try
. ./env.sh
if ! curl -sf 127.0.0.1:18555/v1/models >/dev/null; then
  nohup node mock-llm.mjs 18555 > state/mock.out 2>&1 & echo $! > state/mock.pid
  sleep 0.5
fi
start=$(date +%s.%N)
nohup openclaw gateway run --port 19001 --bind loopback --auth token --token "$OPENCLAW_GATEWAY_TOKEN" --verbose > state/gateway.log 2>&1 &
echo $! > state/gw.pid
for i in $(seq 1 240); do
  if sed 's/\x1b\[[0-9;]*m//g' state/gateway.log 2>/dev/null | grep -qE '\[gateway\] ready$'; then
    echo "gateway ready after $(echo "$(date +%s.%N) - $start" | bc)s (pid $(cat state/gw.pid))"; exit 0
  fi
  if ! kill -0 "$(cat state/gw.pid)" 2>/dev/null; then echo "gateway exited"; tail -30 state/gateway.log; exit 1; fi
  sleep 0.25
done
echo "timeout waiting for gateway"; exit 1
