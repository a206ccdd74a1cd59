// Validate ServiceMonitor and PrometheusRule objects against the prometheus-operator
// schemas shipped by @kubernetes-models/prometheus-operator.
//
// Usage: node validate_crds.mjs <node tools dir>  < objects.json
// stdin: a JSON array of Kubernetes objects. stdout: a JSON array of
// {"kind", "name", "ok", "error"}. Exit 0 even when objects are invalid (the caller
// reads the results); exit 2 when the package cannot be loaded.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const toolsDir = process.argv[2];
if (!toolsDir) {
  console.error("usage: node validate_crds.mjs <node tools dir> < objects.json");
  process.exit(2);
}
const entry = join(toolsDir, "node_modules", "@kubernetes-models", "prometheus-operator",
  "monitoring.coreos.com", "v1", "index.js");
let models;
try {
  models = await import(pathToFileURL(entry).href);
} catch (e) {
  console.error(`cannot load @kubernetes-models/prometheus-operator from ${entry}: ${e.message}\n` +
    "install it with: bash helm/check/install.sh");
  process.exit(2);
}

const objects = JSON.parse(readFileSync(0, "utf8"));
const results = objects.map((obj) => {
  const kind = obj.kind;
  const name = obj.metadata?.name ?? "";
  const Model = models[kind];
  if (obj.apiVersion !== "monitoring.coreos.com/v1" || typeof Model !== "function") {
    return { kind, name, ok: false, error: `no prometheus-operator model for ${obj.apiVersion} ${kind}` };
  }
  try {
    new Model(obj).validate();
    return { kind, name, ok: true, error: null };
  } catch (e) {
    return { kind, name, ok: false, error: String(e.message ?? e) };
  }
});
process.stdout.write(JSON.stringify(results));
