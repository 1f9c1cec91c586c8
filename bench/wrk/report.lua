-- Shared by the V2 scripts: reads the request files that bench/service_load.py writes, and
-- prints wrk's summary as one JSON line that the benchmark parses.
local M = {}

-- The whole file at `path` (a Lua string holds bytes, so raw FP32 tensors come back intact).
function M.read(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

-- wrk's `init(args)` arguments, after `--`: DIR PATH. DIR holds the request files (count.txt:
-- how many); PATH is the URL path posted to.
function M.args(args)
  local dir, path = args[1], args[2]
  assert(dir and path, "usage: wrk ... -s SCRIPT URL -- DIR PATH")
  return dir, path, tonumber(M.read(dir .. "/count.txt"))
end

-- The pause before each request on a connection, in ms (the "slow arrivals" mode): the
-- WRK_DELAY_MS environment variable, 0 when unset. An environment variable and not an argument,
-- because wrk asks whether the script has a delay() before it hands the arguments to init().
function M.pause()
  return tonumber(os.getenv("WRK_DELAY_MS") or "0")
end

-- One JSON line: requests and non-2xx/3xx answers in the run, its duration and latency
-- percentiles (wrk measures in microseconds).
function M.done(summary, latency)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "connect_errors": %d, '
      .. '"read_errors": %d, "write_errors": %d, "timeouts": %d, "p50_us": %d, '
      .. '"p90_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max))
end

return M
