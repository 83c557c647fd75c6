// Parse and validate an AsyncAPI document; print errors and warnings, exit 1 on errors.
// Usage: node check.mjs path/to/asyncapi.yaml
import { Parser, fromFile } from '@asyncapi/parser';

const SEVERITY = ['error', 'warning', 'info', 'hint'];
const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, process.argv[2]).parse();
for (const d of diagnostics) {
  if (d.severity <= 1) {
    console.log(`${SEVERITY[d.severity]} ${d.code} ${d.path.join('/')}: ${d.message}`);
  }
}
if (!document) {
  process.exit(1);
}
const summary = {
  channels: document.channels().all().map((c) => c.id()),
  operations: document.operations().all().map((o) => o.id()),
  payloads: Object.fromEntries(
    document.components().messages().all().map((m) => [m.id(), Object.keys(m.payload()?.properties() ?? {})]),
  ),
};
console.log(JSON.stringify(summary));
