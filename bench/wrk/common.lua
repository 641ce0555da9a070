-- Helpers shared by the kvstore wrk scripts.
--
-- Key ids and values match what bench/dataset.py preloads, so GETs hit real
-- keys and PUTs overwrite values of the same shape. Script arguments are
-- name=value pairs given after `--` on the wrk command line. done() prints a
-- single line "BENCH_RESULT {json}" that bench/loadgen.py parses. Every
-- script also takes token=... (see M.headers).

local M = {}

-- Every thread state counts the requests it sent here; done() runs in the
-- main state and reads them back through the thread objects.
sent = 0
capped = false

local max_requests = 0
local threads = {}

function M.key_id(n)
   return string.format("key-%012d", n)
end

function M.value(n)
   return string.format('{"n":%d,"name":"item-%d","tags":["bench","kv"]}', n, n)
end

-- Headers for requests: Content-Type when there is a body, and a bearer
-- token when the token=... argument is given (the suite turns kvstore's API
-- tokens on). Each call returns a new table, since wrk.format adds to it.
function M.headers(opts, with_body)
   local headers = {}
   if with_body then
      headers["Content-Type"] = "application/json"
   end
   if opts.token ~= nil and opts.token ~= "" then
      headers["Authorization"] = "Bearer " .. opts.token
   end
   return headers
end

-- Parse "name=value" arguments over `defaults`; numeric defaults make the
-- parsed value numeric too. wrk passes the URL as args[0] and the words
-- after `--` from args[1] on.
function M.options(args, defaults)
   local opts = {}
   for name, value in pairs(defaults) do
      opts[name] = value
   end
   for i = 1, #args do
      local arg = args[i]
      local name, value = string.match(arg, "^([%w_]+)=(.*)$")
      if name == nil then
         error("script arguments are name=value, got: " .. arg)
      end
      if type(defaults[name]) == "number" then
         value = tonumber(value)
      end
      opts[name] = value
   end
   max_requests = tonumber(opts.max_requests or 0)
   math.randomseed(tonumber(opts.seed or 1))
   return opts
end

-- Count one request and stop the thread once the request cap is reached, so
-- a run is bounded by count as well as by wrk's -d duration.
function M.count()
   sent = sent + 1
   if max_requests > 0 and sent >= max_requests and not capped then
      capped = true
      wrk.thread:stop()
   end
end

function M.setup(thread)
   table.insert(threads, thread)
end

function M.done(summary, latency, requests)
   local total_sent = 0
   local any_capped = false
   for _, thread in ipairs(threads) do
      total_sent = total_sent + (thread:get("sent") or 0)
      any_capped = any_capped or thread:get("capped") == true
   end
   local errors = summary.errors
   local parts = {
      string.format('"requests":%d', summary.requests),
      string.format('"duration_us":%d', summary.duration),
      string.format('"bytes":%d', summary.bytes),
      string.format('"sent":%d', total_sent),
      string.format('"capped":%s', tostring(any_capped)),
      string.format(
         '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
         errors.connect, errors.read, errors.write, errors.status, errors.timeout
      ),
      string.format(
         '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%.0f,'
            .. '"p50":%.0f,"p90":%.0f,"p99":%.0f,"p999":%.0f}',
         latency.mean, latency.stdev, latency.max,
         latency:percentile(50), latency:percentile(90),
         latency:percentile(99), latency:percentile(99.9)
      ),
   }
   io.write("BENCH_RESULT {" .. table.concat(parts, ",") .. "}\n")
end

return M
