-- wrk script: Open Inference Protocol (V2) JSON inference requests, one image each, rotating
-- through the request bodies bench/service_load.py wrote (json-<i>.json in DIR).
--
--   wrk -t1 -c64 -d5s -s bench/wrk/v2_json.lua http://127.0.0.1:8000 -- DIR PATH
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local report = dofile(here .. "report.lua")

local requests = {}
local pause = report.pause()
local i = 0

local threads = 0
function setup(thread)
  thread:set("offset", threads * 17)
  threads = threads + 1
end

function init(args)
  local dir, path, n = report.args(args)
  -- Formatted once: request() hands out ready bytes, so the generator's cost per request is
  -- the socket write alone.
  for k = 0, n - 1 do
    local body = report.read(dir .. "/json-" .. k .. ".json")
    requests[k + 1] = wrk.format("POST", path, { ["Content-Type"] = "application/json" }, body)
  end
  -- Threads start at different images, so that they do not send the same one in step.
  i = (offset or 0) % #requests
end

function request()
  i = i % #requests + 1
  return requests[i]
end

-- wrk decides once, from the script as loaded, whether a delay() exists: defining it only in the
-- slow-arrivals mode keeps the timer off the saturating runs' path.
if pause > 0 then
  function delay()
    return pause
  end
end

done = report.done
