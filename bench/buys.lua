-- wrk script for bench/run: buys of one product (PRODUCT, in the
-- environment), each with a key of its own, as real clients send them.
-- Prints how many answers had the EXPECTed status, so that a rate counts
-- only the path it names (409: the sold-out fast path; 202: durable accepts).
local threads = {}
local product = os.getenv("PRODUCT") or "6"
-- PRODUCTS="2,3,4" spreads the buys over those products instead (one per
-- request in turn), so that every queue partition gets its share.
local products = {}
for p in (os.getenv("PRODUCTS") or ""):gmatch("%d+") do table.insert(products, p) end
local expect = tonumber(os.getenv("EXPECT") or "409")
local run = tostring(os.time())
-- KEYS=sequential keeps the old `wrk-<run>-<thread>-<n>` keys; the default is a
-- random UUIDv4 a request (36 characters), what real clients send.
local sequential = os.getenv("KEYS") == "sequential"
-- TOKENS names a file of "<user> <jwt>" lines (fsctl token): each request
-- then buys as one of those users, with its token (FLASHSALE_AUTH=jwt).
local token_file = os.getenv("TOKENS")
local tokens = {}

local function uuid4()
  local r = function() return math.random(0, 0xffff) end
  return string.format("%04x%04x-%04x-4%03x-%x%03x-%04x%04x%04x",
    r(), r(), r(), math.random(0, 0xfff), math.random(8, 11), math.random(0, 0xfff), r(), r(), r())
end

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  n = 0
  expected = 0
  math.randomseed(os.time() * 1000 + id)
  if token_file then
    for line in io.lines(token_file) do
      local user, token = line:match("^(%S+) (%S+)$")
      if user then table.insert(tokens, {user, "Bearer " .. token}) end
    end
  end
end

function request()
  n = n + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = sequential and string.format("wrk-%s-%d-%d", run, id, n) or uuid4(),
  }
  local user = "u" .. (n % 1000)
  if #tokens > 0 then
    local t = tokens[(n % #tokens) + 1]
    user = t[1]
    headers["Authorization"] = t[2]
  end
  local pick = #products > 0 and products[(n % #products) + 1] or product
  local body = string.format('{"userId":"%s","productId":%s,"quantity":1}', user, pick)
  return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
  if status == expect then
    expected = expected + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do
    total = total + t:get("expected")
  end
  io.write(string.format("%ds %d of %d\n", expect, total, summary.requests))
end
