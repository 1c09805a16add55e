// A department system in Node.js: runs a 告知承诺 case against a govflow server with grpc-js,
// each agency with its own bearer token, as separate department systems would. The services are
// loaded from ../../proto at start (@grpc/proto-loader), so nothing generated is kept.
//
//     npm ci --prefix examples/node
//     node examples/node/gaozhi_client.mjs --server 127.0.0.1:50051 \
//         --credentials govflow-data/credentials.toml
//
// Exit status 0 when every step answered as expected, 1 otherwise (naming the step).

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const { values: args } = parseArgs({
  options: {
    server: { type: "string", default: "127.0.0.1:50051" },
    credentials: { type: "string", default: "govflow-data/credentials.toml" },
    "case-id": { type: "string", default: "gz-node-1" },
    proto: { type: "string", default: join(dirname(fileURLToPath(import.meta.url)), "../../proto") },
  },
});
const PLATFORM = "hebei.sjz.platform";
const APPROVAL = "hebei.sjz.approval";
const HOUSING = "hebei.sjz.housing";
const TAX = "hebei.sjz.tax";

// The generated token file: `"agency" = "token"` lines under [tokens].
const tokens = Object.fromEntries(
  readFileSync(args.credentials, "utf8")
    .split("\n")
    .map((line) => line.match(/^"?([^"=\s]+)"?\s*=\s*"([^"]+)"/))
    .filter(Boolean)
    .map((m) => [m[1], m[2]]),
);

const definition = protoLoader.loadSync("govflow/v1/cases.proto", {
  includeDirs: [args.proto],
  keepCase: true,
  longs: String,
  defaults: true,
  oneofs: true,
});
const { CasesService } = grpc.loadPackageDefinition(definition).govflow.v1;
const cases = new CasesService(args.server, grpc.credentials.createInsecure());

// google.rpc.Status and ErrorInfo, to read the reason govflow puts in every error.
const rpc = protobuf.parse(`
  syntax = "proto3";
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`, { keepCase: true }).root;

function reason(error) {
  const [details] = error.metadata?.get("grpc-status-details-bin") ?? [];
  if (!details) return "";
  for (const any of rpc.lookupType("Status").decode(details).details) {
    if (any.type_url.endsWith("google.rpc.ErrorInfo")) {
      return rpc.lookupType("ErrorInfo").decode(any.value).reason;
    }
  }
  return "";
}

function as(agency) {
  const metadata = new grpc.Metadata();
  if (agency) metadata.set("authorization", `Bearer ${tokens[agency]}`);
  return metadata;
}

// A JSON value as a google.protobuf.Value.
function value(v) {
  if (v === null) return { nullValue: "NULL_VALUE" };
  if (Array.isArray(v)) return { listValue: { values: v.map(value) } };
  switch (typeof v) {
    case "string": return { stringValue: v };
    case "number": return { numberValue: v };
    case "boolean": return { boolValue: v };
    default: return { structValue: struct(v) };
  }
}
function struct(object) {
  return { fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, value(v)])) };
}

const call = (method, request, agency) =>
  new Promise((resolve, reject) =>
    cases[method](request, as(agency), (error, response) => (error ? reject(error) : resolve(response))));

class Failed extends Error {}

const id = args["case-id"];
const name = `cases/${id}`;

async function fire(agency, event, payload = {}, requestId = `${id}-${event}`) {
  const { case: c } = await call("FireEvent", { request_id: requestId, case: name, event, payload: struct(payload) }, agency);
  console.log(`${agency.padStart(20)} fired ${event.padEnd(8)} -> ${c.state} (step ${c.sequence})`);
  return c;
}

async function refused(what, code, why, attempt) {
  try {
    await attempt();
  } catch (error) {
    if (error.code !== code || reason(error) !== why) {
      throw new Failed(`${what}: ${error.code} [${reason(error)}] ${error.details}, expected ${code} [${why}]`);
    }
    console.log(`${"".padStart(20)} ${what}: ${grpc.status[code]} [${why}]`);
    return;
  }
  throw new Failed(`${what}: answered, expected ${grpc.status[code]}`);
}

async function main() {
  const { case: created } = await call("CreateCase", {
    request_id: `${id}-start`,
    case_id: id,
    workflow: "gaozhi_chengnuo",
    bindings: { approval: APPROVAL, supervision: HOUSING, registration: "hebei.sjz.amr" },
    variables: struct({
      permit_id: "SGXK-1",
      permit_name: "建筑工程施工许可",
      enterprise_name: "石家庄某置业有限公司",
      credit_code: "91130102MA0HOUS001",
    }),
  }, PLATFORM);
  console.log(`${PLATFORM.padStart(20)} started  ${created.id} -> ${created.state}`);
  await fire(PLATFORM, "apply");
  await fire(APPROVAL, "inform", {
    conditions: ["已取得建设工程规划许可证"],
    supervision_rules: "领证后30日内核查",
    breach_consequences: "撤销许可",
    model_letter: "示范文本",
  });
  // The commitment comes with the materials asked for (a non-empty list): without them it is refused.
  const commitment = { kind: "conditions_met", commitment_text: "承诺已具备条件" };
  await refused("a commitment without materials", grpc.status.INVALID_ARGUMENT, "invalid-payload",
    () => fire(PLATFORM, "commit", commitment, `${id}-commit-without-materials`));
  await fire(PLATFORM, "commit", { ...commitment, materials: ["告知承诺书（已签章）", "建设工程规划许可证"] });
  await refused("the platform grants", grpc.status.PERMISSION_DENIED, "role-not-allowed",
    () => fire(PLATFORM, "grant", {}, `${id}-grant-by-platform`));
  await refused("another agency reads", grpc.status.NOT_FOUND, "case-not-found",
    () => call("GetCase", { name }, TAX));
  await refused("no token", grpc.status.UNAUTHENTICATED, "no-credential",
    () => call("GetCase", { name }, null));
  const granted = await fire(APPROVAL, "grant");
  const again = await fire(APPROVAL, "grant");
  if (again.sequence !== granted.sequence || again.state !== granted.state) {
    throw new Failed("a retry of grant moved the case");
  }
  const inbox = await call("ListInbox", {}, HOUSING);
  const mine = inbox.items.filter((item) => item.case.id === id);
  if (mine.length === 0) throw new Failed("the case is not in the supervising agency's inbox");
  console.log(`${HOUSING.padStart(20)} inbox has ${id}, may fire ${mine[0].events.join(", ")}`);

  const steps = [];
  await new Promise((resolve, reject) => {
    const stream = cases.WatchEvents({ cursor: "0" }, as(HOUSING));
    stream.on("data", (event) => {
      if (event.history_entry.case_id === id) steps.push(event.history_entry.event);
      if (steps.length === Number(granted.sequence)) {
        stream.cancel();
        resolve();
      }
    });
    stream.on("error", (error) => (error.code === grpc.status.CANCELLED ? resolve() : reject(error)));
  });
  console.log(`${HOUSING.padStart(20)} watched ${steps.join(" → ")}`);
  if (steps.at(-1) !== "grant") throw new Failed(`the watch ended with ${steps}`);
}

main()
  .then(() => process.exit(0))
  .catch((error) => {
    console.error(error instanceof Failed
      ? `FAILED: ${error.message}`
      : `FAILED: ${error.code ?? ""} [${reason(error)}] ${error.details ?? error.message}`);
    process.exit(1);
  });
