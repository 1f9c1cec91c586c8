-- wrk script: V2 inference requests in the binary tensor extension, one image each, rotating
-- through the files bench/service_load.py wrote in DIR: header-<i>.json (the JSON inference
-- header, whose input carries "parameters": {"binary_data_size": 3136}) and tensor-<i>.f32
-- (the image as raw little-endian FP32, 784 values). The body is the header followed by the
-- tensor bytes, and Inference-Header-Content-Length says where the header ends.
--
--   wrk -t1 -c64 -d5s -s bench/wrk/v2_binary.lua http://127.0.0.1:8000 -- DIR PATH
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
  for k = 0, n - 1 do
    local header = report.read(dir .. "/header-" .. k .. ".json")
    local headers = {
      ["Content-Type"] = "application/octet-stream",
      ["Inference-Header-Content-Length"] = tostring(#header),
    }
    local body = header .. report.read(dir .. "/tensor-" .. k .. ".f32")
    requests[k + 1] = wrk.format("POST", path, headers, body)
  end
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
