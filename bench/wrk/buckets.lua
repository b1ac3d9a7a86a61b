-- wrk script of guardd's benchmark: every response counted by 10 ms bucket, status and
-- the X-Color that answered, and every request sent by 10 ms bucket, so that the
-- harness can say which errors came before, during or after a switch.
--   BENCH_WRK_OUT=FILE          where done() writes its JSON
--   BENCH_CONNECTION_CLOSE=1    send `Connection: close` (a fresh connection per request)
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local CLOCK_REALTIME = 0

local function bucket()
  ffi.C.clock_gettime(CLOCK_REALTIME, ts)
  return tonumber(ts.tv_sec) * 100 + math.floor(tonumber(ts.tv_nsec) / 10000000)
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local headers = {}
  if os.getenv("BENCH_CONNECTION_CLOSE") == "1" then
    headers["Connection"] = "close"
  end
  req = wrk.format("GET", "/healthz", headers)
  sent = {}
  got = {}
end

function request()
  local b = bucket()
  sent[b] = (sent[b] or 0) + 1
  return req
end

function response(status, headers, body)
  local key = bucket() .. " " .. status .. " " .. (headers["X-Color"] or "-")
  got[key] = (got[key] or 0) + 1
end

function done(summary, latency, requests)
  local out = assert(io.open(os.getenv("BENCH_WRK_OUT"), "w"))
  local e = summary.errors
  out:write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, "sent": [',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
  local first = true
  for _, thread in ipairs(threads) do
    for b, n in pairs(thread:get("sent")) do
      out:write(string.format('%s[%d, %d]', first and "" or ", ", b, n))
      first = false
    end
  end
  out:write('], "got": [')
  first = true
  for _, thread in ipairs(threads) do
    for key, n in pairs(thread:get("got")) do
      local b, status, color = key:match("(%d+) (%d+) (%S+)")
      out:write(string.format('%s[%s, %s, "%s", %d]', first and "" or ", ", b, status, color, n))
      first = false
    end
  end
  out:write("]}\n")
  out:close()
end
