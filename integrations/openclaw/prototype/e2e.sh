#!/usr/bin/env bash
# End-to-end smoke test: fresh state -> mock LLM + gateway -> plain turn, tool turn,
# follow-ups via (a) next-turn injection + system event + heartbeat and (b) subagent.run.
set -u
cd /tmp/openclaw-try
. ./env.sh
./stop-gateway.sh
if [ "${1:-}" = "--fresh" ]; then
  rm -rf state/oc state/home; mkdir -p state/oc state/home
  : > state/mock-requests.jsonl; : > state/claw-try.log
fi
cp openclaw.json5 state/openclaw.json
./start-gateway.sh || exit 1
send() {  # send <sessionKey> <text>  -> prints the final assistant text of that turn
  curl -s http://127.0.0.1:19001/v1/chat/completions \
    -H "authorization: Bearer $OPENCLAW_GATEWAY_TOKEN" -H 'content-type: application/json' \
    -H "x-openclaw-session-key: $1" \
    -d "{\"model\":\"openclaw\",\"messages\":[{\"role\":\"user\",\"content\":\"$2\"}]}" |
    node -e 'const r=JSON.parse(require("fs").readFileSync(0,"utf8"));console.log(r.choices?.[0]?.message?.content ?? JSON.stringify(r))'
}
history() {  # history <sessionKey>
  openclaw gateway call chat.history --params "{\"sessionKey\":\"$1\"}" --json |
    node -e 'const h=JSON.parse(require("fs").readFileSync(0,"utf8"));for(const m of h.messages){const c=typeof m.content==="string"?m.content:m.content.map(p=>p.text??("["+p.type+" "+(p.name??"")+"]")).join("");console.log("  ",m.__openclaw?.seq,m.role,c.slice(0,160))}'
}
echo "== plain turn";  send agent:main:e2e-plain "hi"
echo "== tool turn + injection/system-event/heartbeat follow-up"; send agent:main:e2e-hb "please echo mode=inject-heartbeat"
echo "== tool turn + subagent.run follow-up"; send agent:main:e2e-sub "please echo mode=subagent"
sleep 12
echo "== chat.history e2e-hb"; history agent:main:e2e-hb
echo "== chat.history e2e-sub"; history agent:main:e2e-sub
echo "== plugin log (follow-ups)"; grep -E "follow-up|enqueue|requestHeartbeat|subagent" state/claw-try.log | tail -8 | cut -c1-260
[ "${2:-}" = "--keep" ] || ./stop-gateway.sh
