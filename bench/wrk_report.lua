-- wrk hook for bench/harness.py: one machine-readable line with the totals and latency
-- percentiles (µs). An optional WRK_METHOD / header set comes from the harness's -H flags.
local method = os.getenv("WRK_METHOD")
if method then
  wrk.method = method
end

-- A paced run (WRK_DELAY_MS): each connection waits that long after each answer before its
-- next request, so N connections make about N * 1000 / (delay + latency) requests a second.
local pace = tonumber(os.getenv("WRK_DELAY_MS") or "")
if pace then
  delay = function()
    return pace
  end
end

done = function(summary, latency, requests)
  local ps = {1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9}
  local parts = {}
  for _, p in ipairs(ps) do
    parts[#parts + 1] = string.format('"%s":%d', tostring(p):gsub("%.0$", ""), latency:percentile(p))
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"p":{%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ",")))
end
