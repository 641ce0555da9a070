-- Single-key requests on preloaded keys: GET or PUT of a random key.
--
-- Arguments: method=GET|PUT keys=N max_requests=N seed=N
-- HEAD works only against servers whose HEAD responses carry no
-- Content-Length, since wrk waits for the body it announces; the suite
-- drives HEAD with bench/httpload.py instead.
-- Requests are built once in init(), so the per-request cost in wrk is a
-- table lookup.

local common = require "common"

setup = common.setup
done = common.done

local prepared = {}
local count = 0

function init(args)
   local opts = common.options(args, { method = "GET", keys = 10000 })
   local with_body = opts.method == "PUT"
   local headers = common.headers(opts, with_body)
   for n = 0, opts.keys - 1 do
      local path = "/keys/" .. common.key_id(n)
      local body = nil
      if with_body then
         body = common.value(n + 1)
      end
      prepared[n + 1] = wrk.format(opts.method, path, headers, body)
   end
   count = opts.keys
end

function request()
   common.count()
   return prepared[math.random(count)]
end
