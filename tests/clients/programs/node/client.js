// Node's HTTP client (undici) as an application uses it behind a proxy: EnvHttpProxyAgent reads
// HTTP_PROXY / HTTPS_PROXY / NO_PROXY, NODE_EXTRA_CA_CERTS adds the test CA. undici is found
// through NODE_PATH (make install-test installs it in .venv/node-clients).
//   node client.js request METHOD URL [BODY]   prints {"status", "reason", "headers", "body"}
//   node client.js websocket URL MESSAGE       prints {"echo"}
// A failure prints what the application would log (the error and its cause) and exits 1.
const { EnvHttpProxyAgent, WebSocket, fetch } = require("undici");

const TIMEOUT_MS = 15000;
const dispatcher = new EnvHttpProxyAgent();

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
    await dispatcher.close();
  } catch (error) {
    process.stderr.write(describe(error) + "\n");
    process.exit(1);
  }
}

main();
