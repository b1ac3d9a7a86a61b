-- wrk script of guardd's benchmark: GET BENCH_PATH at a fixed total rate (BENCH_RATE req/s).
-- wrk has no rate option; each thread owns rate/threads of the schedule, and every
-- connection, as it gets its answer, takes the thread's next slot and waits for it
-- (delay() in whole milliseconds: single requests jitter by up to 1 ms, the rate holds).
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_rate_timespec;
int clock_gettime(int clk_id, bench_rate_timespec *tp);
]]
local ts = ffi.new("bench_rate_timespec")
local CLOCK_MONOTONIC = 1

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1000000
end

local nthreads = 0
function setup(thread)
  nthreads = nthreads + 1
  thread:set("id", nthreads)
end

local started, slot, period
function init(args)
  req = wrk.format("GET", os.getenv("BENCH_PATH") or "/api/orders")
end

function request()
  return req
end

function delay()
  if started == nil then
    local threads = tonumber(os.getenv("BENCH_THREADS") or "1")
    period = 1000 * threads / tonumber(os.getenv("BENCH_RATE") or "100")
    started = now_ms()
    slot = 0
  end
  slot = slot + 1
  local wait = started + slot * period - now_ms()
  if wait < 0 then
    return 0
  end
  return math.floor(wait)
end
