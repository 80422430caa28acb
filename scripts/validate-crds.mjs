// Validates the Kubernetes objects of custom kinds (KEDA's ScaledObject, the Prometheus
// operator's ServiceMonitor and PrometheusRule) against their CRD schemas, as the npm packages
// @kubernetes-models/keda and @kubernetes-models/prometheus-operator carry them.
//   node scripts/validate-crds.mjs TOOLS_DIR < objects.json
// objects.json is a JSON array of objects; those of other kinds are skipped. Prints each
// object checked and exits 1 when any is refused.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const tools = process.argv[2];
const models = {
  "keda.sh/v1alpha1/ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject.js",
  "monitoring.coreos.com/v1/ServiceMonitor":
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js",
  "monitoring.coreos.com/v1/PrometheusRule":
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule.js",
};
const objects = JSON.parse(readFileSync(0, "utf8"));
let refused = 0;
for (const object of objects) {
  const key = `${object.apiVersion}/${object.kind}`;
  const path = models[key];
  if (!path) continue;
  const module = await import(pathToFileURL(`${tools}/node_modules/${path}`).href);
  const Model = Object.values(module).find((v) => typeof v === "function" && v.name === object.kind);
  try {
    new Model(object).validate();
    console.log(`valid: ${key} ${object.metadata.name}`);
  } catch (e) {
    refused += 1;
    console.log(`INVALID: ${key} ${object.metadata.name}: ${e.message}`);
  }
}
process.exit(refused ? 1 : 0);
