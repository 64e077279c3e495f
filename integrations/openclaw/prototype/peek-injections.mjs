// node peek-injections.mjs  -> prints sessions with pending pluginNextTurnInjections (read-only)
import { DatabaseSync } from "node:sqlite";
for (const f of ["state/oc/agents/main/agent/openclaw-agent.sqlite", "state/oc/state/openclaw.sqlite"]) {
  const db = new DatabaseSync("/tmp/openclaw-try/" + f, { readOnly: true });
  for (const { name } of db.prepare("select name from sqlite_master where type='table'").all()) {
    const cols = db.prepare(`pragma table_info("${name}")`).all().map((c) => c.name);
    for (const c of cols) {
      try {
        const rows = db.prepare(`select rowid, "${c}" as v from "${name}" where cast("${c}" as text) like '%pluginNextTurnInjections%'`).all();
        for (const r of rows) console.log(f, name, c, String(r.v).match(/"pluginNextTurnInjections":\{.{0,200}/)?.[0]);
      } catch {}
    }
  }
}
