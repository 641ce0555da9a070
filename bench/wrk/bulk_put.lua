-- Bulk PUT /keys with a body of `pairs` pairs over the preloaded key range.
--
-- Arguments: pairs=N keys=N bodies=N expire_in=SECONDS max_requests=N seed=N
-- `bodies` distinct requests are built in init() and sent in random order;
-- expire_in=0 leaves out the query parameter.

local common = require "common"

setup = common.setup
done = common.done

local prepared = {}
local count = 0

function init(args)
   local opts = common.options(
      args, { pairs = 100, keys = 10000, bodies = 256, expire_in = 0 }
   )
   local path = "/keys"
   if opts.expire_in > 0 then
      path = path .. "?expire_in=" .. opts.expire_in
   end
   local headers = common.headers(opts, true)
   for b = 1, opts.bodies do
      local items = {}
      for p = 1, opts.pairs do
         local n = math.random(opts.keys) - 1
         items[p] = '"' .. common.key_id(n) .. '":' .. common.value(b * p)
      end
      local body = "{" .. table.concat(items, ",") .. "}"
      prepared[b] = wrk.format("PUT", path, headers, body)
   end
   count = opts.bodies
end

function request()
   common.count()
   return prepared[math.random(count)]
end
