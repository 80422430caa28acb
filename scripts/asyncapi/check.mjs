// Parses and validates an AsyncAPI document with the AsyncAPI parser (the AsyncAPI schema and
// its Spectral rules), resolving the payload schemas it refers to under docs/events/. Then
// validates every message example against its payload schema with Ajv (draft 2020-12, formats
// asserted), the validator a JavaScript publisher would use. Exits 1 on any error or warning.
import { Parser, fromFile } from '@asyncapi/parser';
import Ajv2020 from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';

const path = process.argv[2];
const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, path).parse();
const severities = ['error', 'warning', 'info', 'hint'];
let failed = document === undefined;
for (const d of diagnostics) {
  console.error(`${severities[d.severity]}: ${d.code}: ${d.message} at ${d.path.join('.')}`);
  if (d.severity <= 1) failed = true;
}
if (failed) {
  console.error(`${path}: not a valid AsyncAPI document`);
  process.exit(1);
}

// The parser tags each schema with x-parser-* keys; Ajv is told they are annotations.
const ajv = new Ajv2020({ strict: false, allErrors: true });
addFormats(ajv);
let examples = 0;
for (const message of document.allMessages().all()) {
  if (!message.hasPayload() || message.examples().length === 0) continue;
  const validate = ajv.compile(message.payload().json());
  for (const example of message.examples().all()) {
    examples += 1;
    if (!validate(example.payload())) {
      failed = true;
      console.error(`${message.name()}: example ${example.name()}:`, ajv.errorsText(validate.errors));
    }
  }
}
if (failed) process.exit(1);
console.log(
  `${path}: AsyncAPI ${document.version()}, ${document.channels().length} channels, ` +
    `${document.operations().length} operations, ${document.allMessages().length} messages, ` +
    `${examples} examples valid`,
);
