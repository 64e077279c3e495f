#!/usr/bin/env bash
cd /tmp/openclaw-try
[ -f state/gw.pid ] && kill -TERM "$(cat state/gw.pid)" 2>/dev/null && while kill -0 "$(cat state/gw.pid)" 2>/dev/null; do sleep 0.2; done
[ "${1:-}" = "--all" ] && [ -f state/mock.pid ] && kill "$(cat state/mock.pid)" 2>/dev/null
true
