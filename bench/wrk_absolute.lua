-- wrk script: absolute-form GETs through a forward proxy (wrk's own URL names the proxy).
-- BENCH_TARGET: the URL to ask the proxy for; BENCH_HOST: its Host field.
-- done() prints one JSON line for bench/run.py.
local target = os.getenv("BENCH_TARGET")
local host = os.getenv("BENCH_HOST")
local req = "GET " .. target .. " HTTP/1.1\r\nHost: " .. host .. "\r\nUser-Agent: wrk\r\n\r\n"

request = function()
  return req
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
