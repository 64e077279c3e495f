// Generates src/generated/protocol.ts from the JSON Schemas in nats/schema/ (the protocol's
// source of truth, checked against real traffic by the interop test), so the client's types
// cannot drift from what the system sends. Run by `npm run build`; the output is not committed.
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { compile } from "json-schema-to-typescript";

const here = dirname(fileURLToPath(import.meta.url));
const schemaDir = join(here, "..", "..", "..", "nats", "schema");
const outFile = join(here, "..", "src", "generated", "protocol.ts");

// JSON Schema's `if`/`then` (the event schema says which `data` goes with which `type` that way)
// has no TypeScript form; the same rules as a `oneOf` of one variant per type do: a union
// discriminated by `type`.
function discriminate(schema) {
  const rules = new Map();
  for (const rule of schema.allOf ?? []) {
    const type = rule.if?.properties?.type?.const;
    if (type === undefined || !rule.then?.properties) return schema;
    rules.set(type, rule.then.properties);
  }
  if (rules.size === 0 || !schema.properties?.type?.enum) return schema;
  const { allOf, ...rest } = schema;
  const oneOf = schema.properties.type.enum.map((type) => ({
    type: "object",
    required: schema.required,
    additionalProperties: false,
    properties: { ...schema.properties, type: { const: type }, ...(rules.get(type) ?? {}) },
  }));
  return { ...rest, properties: undefined, required: undefined, additionalProperties: undefined, oneOf };
}

const work = await mkdtemp(join(tmpdir(), "claw-schema-"));
const files = (await readdir(schemaDir)).filter((f) => f.endsWith(".schema.json")).sort();
for (const f of files) {
  const schema = JSON.parse(await readFile(join(schemaDir, f), "utf8"));
  await writeFile(join(work, f), JSON.stringify(discriminate(schema)));
}

// One root schema referring to every file, compiled at once, so a definition shared between
// files (the record's status in the error and the event) becomes one named type, not one copy
// per file that uses it.
const root = {
  $id: "protocol",
  title: "Protocol",
  type: "object",
  properties: Object.fromEntries(files.map((f) => [f.replace(".schema.json", ""), { $ref: f }])),
  additionalProperties: false,
};
const ts = await compile(root, "Protocol", {
  cwd: work,
  bannerComment:
    "/* Generated from nats/schema/ by scripts/gen-types.mjs: do not edit. */\n/* eslint-disable */",
  additionalProperties: false,
  unreachableDefinitions: true,
  strictIndexSignatures: true,
  format: true,
});
await rm(work, { recursive: true, force: true });
await mkdir(dirname(outFile), { recursive: true });
await writeFile(outFile, ts);
console.log(`wrote ${outFile} from ${files.length} schemas`);
