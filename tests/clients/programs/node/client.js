// Node's HTTP client as an application uses it behind a proxy, in one of two ways:
// - Node 18 and 20: the undici package's fetch and WebSocket with an EnvHttpProxyAgent, which
//   reads HTTP_PROXY / HTTPS_PROXY / NO_PROXY; undici is found through NODE_PATH (make
//   install-test installs it in .venv/node-clients).
// - Node with NODE_USE_ENV_PROXY=1 (24 and later): the built-in fetch and WebSocket, which then
//   read the same variables themselves.
// NODE_EXTRA_CA_CERTS adds the test CA to either.
//   node client.js request METHOD URL [BODY]   prints {"status", "reason", "headers", "body"}
//   node client.js websocket URL MESSAGE       prints {"echo"}
// A failure prints what the application would log (the error and its cause) and exits 1.
const builtin = process.env.NODE_USE_ENV_PROXY === "1";
const undici = builtin ? null : require("undici");
const fetch = builtin ? globalThis.fetch : undici.fetch;
const WebSocket = builtin ? globalThis.WebSocket : undici.WebSocket;

const TIMEOUT_MS = 15000;
// undefined: the built-in clients use the global dispatcher NODE_USE_ENV_PROXY sets up.
const dispatcher = builtin ? undefined : new undici.EnvHttpProxyAgent();

async function request(method, url, body) {
  const response = await fetch(url, {
    method, body, dispatcher, signal: AbortSignal.timeout(TIMEOUT_MS),
  });
  return {
    status: response.status,
    reason: response.statusText,
    headers: Object.fromEntries(response.headers),
    body: await response.text(),
  };
}

function websocket(url, message) {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(url, { dispatcher });
    const timer = setTimeout(() => reject(new Error("timed out")), TIMEOUT_MS);
    socket.onopen = () => socket.send(message);
    socket.onmessage = (event) => {
      clearTimeout(timer);
      socket.close();
      resolve({ echo: String(event.data) });
    };
    socket.onerror = (event) => {
      clearTimeout(timer);
      reject(event.error ?? new Error(event.message ?? "websocket error"));
    };
  });
}

function describe(error) {
  const parts = [];
  for (let e = error; e; e = e.cause) parts.push(`${e.name}: ${e.message}`);
  return parts.join("\ncaused by ");
}

async function main() {
  const [mode, ...args] = process.argv.slice(2);
  try {
    const result = mode === "websocket" ? await websocket(...args) : await request(...args);
    process.stdout.write(JSON.stringify(result));
    await dispatcher?.close();
  } catch (error) {
    process.stderr.write(describe(error) + "\n");
    process.exit(1);
  }
}

main();
