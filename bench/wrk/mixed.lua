-- Mixed single-key workload: GET and PUT of random preloaded keys.
--
-- Arguments: get=W put=W keys=N max_requests=N seed=N
-- The weights are relative; the default mix is 80% GET, 20% PUT, a
-- read-heavy pattern that every target in the suite can serve. HEAD is left
-- out because wrk cannot read HEAD responses that carry a Content-Length
-- (see bench/httpload.py).

local common = require "common"

setup = common.setup
done = common.done

local gets, puts = {}, {}
local count = 0
local get_below, total = 0, 0

function init(args)
   local opts = common.options(
      args, { get = 80, put = 20, keys = 10000 }
   )
   local read_headers = common.headers(opts, false)
   local write_headers = common.headers(opts, true)
   for n = 0, opts.keys - 1 do
      local path = "/keys/" .. common.key_id(n)
      gets[n + 1] = wrk.format("GET", path, read_headers)
      puts[n + 1] = wrk.format("PUT", path, write_headers, common.value(n + 7))
   end
   count = opts.keys
   get_below = opts.get
   total = opts.get + opts.put
end

function request()
   common.count()
   local roll = math.random() * total
   local n = math.random(count)
   if roll < get_below then
      return gets[n]
   end
   return puts[n]
end
