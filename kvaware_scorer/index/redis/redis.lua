-- kvaware: the KV-block index on Redis / Valkey. One shard of the index per call.
--
-- ARGV[1] = operation, ARGV[2] = the shard's key prefix, ARGV[3] = entry TTL in ms (0 = none);
-- the rest depends on the operation. KEYS[1] is the shard's counter hash: it only routes the
-- call on a cluster (every key of a shard carries the same hash tag). Layout: docs/redis.md.
--
-- Block value: 3-byte header (ref bit << 7 | touch epoch, creation stamp hi, lo) + holder
-- records in insertion order. A record is one byte (id < 128, default tier, one reference)
-- or 0x80 | (id width - 1) << 5 | has-count << 4 | tier, then the id (1-3 bytes, big-endian),
-- then the reference count (when has-count).

local op = ARGV[1]
local P = ARGV[2]
local TTL = tonumber(ARGV[3])

local call = redis.call
local byte, char, sub, find, concat = string.byte, string.char, string.sub, string.find, table.concat
local floor, min, max = math.floor, math.min, math.max
local bor, band, lshift = bit.bor, bit.band, bit.lshift

if redis.replicate_commands then pcall(redis.replicate_commands) end

local tm = call('TIME')
local NOW = tonumber(tm[1]) * 1000 + floor(tonumber(tm[2]) / 1000)
local PERIOD = max(1000, floor(TTL / 4))
local EPOCH, EXPIRE_PERIODS = 0, 0
if TTL > 0 then
  EPOCH = floor(NOW / PERIOD) % 128
  -- NOTE: one more period than the TTL spans: a block touched just before an epoch boundary
  -- must not look a whole period old right after it.
  EXPIRE_PERIODS = math.ceil(TTL / PERIOD) + 1
end
local SPEC = 65536
local PCS = 0
local QUEUE = TTL > 0
-- NOTE: Lua's C stack takes about 8000 values: bulk calls pass at most CHUNK arguments.
local CHUNK = 4000
-- NOTE: blocks carry no Redis TTL: an expires entry would cost ~40 bytes and a slower SET per
-- block. They expire by the touch epoch in their header, swept by writers ('maint').

local K_C, K_R, K_N, K_L, K_M, K_PE = P .. 'c', P .. 'r', P .. 'n', P .. 'l', P .. 'm', P .. 'pe'
local K_T, K_F, K_Z, K_Q, K_SA, K_SC = P .. 't', P .. 'f', P .. 'z', P .. 'q', P .. 'sa', P .. 'sc'
local PB, PS = P .. 'b', P .. 's'
local EMPTY = {}
-- a byte that is not a one-byte record (those are ids below 128 at the default tier)
local PLAIN_NOT = '[\128-\255]'

-- counters -------------------------------------------------------------------------------

local DC = {}
local function cinc(f, d) DC[f] = (DC[f] or 0) + d end
local PED = {}
local function ped(id, d) PED[id] = (PED[id] or 0) + d end
local QBUF = {}

-- pod `id` holds one block less
local function drop_entry(id)
  cinc('entries', -1)
  ped(id, -1)
end

-- blocks `db` and entries `de` of pod `id` added
local function count_added(id, db, de)
  cinc('blocks', db)
  cinc('entries', de)
  ped(id, de)
end

local function flush_counts()
  for f, d in pairs(DC) do
    if d ~= 0 then call('HINCRBY', K_C, f, d) end
  end
  DC = {}
  for id, d in pairs(PED) do
    if d ~= 0 then call('HINCRBY', K_PE, id, d) end
  end
  PED = {}
  if #QBUF > 0 then
    for i = 1, #QBUF, CHUNK do
      call('RPUSH', K_Q, unpack(QBUF, i, min(#QBUF, i + CHUNK - 1)))
    end
    QBUF = {}
  end
end

local STAMP = nil
local function stamp()
  if not STAMP then STAMP = call('HINCRBY', K_C, 'stamp', 1) % 65536 end
  return STAMP
end

-- registry -------------------------------------------------------------------------------

local function alive(last)
  return TTL == 0 or (last and NOW - tonumber(last) <= TTL)
end

-- ids (as strings) of the registered pods that wrote within the TTL (`live`), or not
local function ids_by_liveness(live)
  local l = call('HGETALL', K_L)
  local ids = {}
  for i = 1, #l, 2 do
    if (alive(l[i + 1]) and true or false) == live then ids[#ids + 1] = l[i] end
  end
  return ids
end


-- the number at field `name` of hash `key` (nil when absent), remembered in `cache`
local function cached_num(cache, key, name)
  local v = cache[name]
  if v then return v end
  v = call('HGET', key, name)
  if v then
    v = tonumber(v)
    cache[name] = v
    return v
  end
  return nil
end

local IDS = {}
local function live_id(name)
  return cached_num(IDS, K_R, name)
end

local LIVE = {}
local function is_live(id)
  local l = LIVE[id]
  if l == nil then
    l = call('HEXISTS', K_N, id) == 1
    LIVE[id] = l
  end
  return l
end

-- meta: (unused) x 3, speculative deadline; the first four fields are kept for the format
local function meta_get(id)
  local s = call('HGET', K_M, id)
  if not s then return { sd = 0 } end
  local sd = string.match(s, '(%d+)$')
  return { sd = tonumber(sd) or 0 }
end

local function meta_put(id, m)
  call('HSET', K_M, id, '0,0,0,-1,' .. m.sd)
end

-- NOTE: nothing but speculative records has a Redis TTL. Expiry is done by the writers'
-- maintenance (quiet pods purged through their reverse index, idle blocks swept), which keeps
-- every counter exact; keys expiring on their own would leave the rest inconsistent.
local function refresh_pod(id)
  call('HSET', K_L, id, NOW)
end

-- a pod's engine-hash map: engine hash -> the keys of its engine block (one Redis hash)
local EK = {}
local function emap_key(id)
  local k = EK[id]
  if not k then
    k = P .. 'e' .. id
    EK[id] = k
  end
  return k
end

-- Forget pod `id` (named `name`) at once: it leaves the registry, its entries leave the
-- counters and its engine-hash map moves aside (P d<id>), to be walked by 'purge_step' calls
-- (the purging client's, or the writers' maintenance). Returns the entries dropped.
local function unregister(name, id)
  local dropped = tonumber(call('HGET', K_PE, id) or 0)
  call('HDEL', K_R, name)
  call('HDEL', K_N, id)
  call('HDEL', K_L, id)
  call('HDEL', K_PE, id)
  IDS[name] = nil
  LIVE[id] = false
  cinc('entries', -dropped)
  -- NOTE: the map moves aside at once, so the id is free of it; the steps walk it later
  local E = emap_key(id)
  local h = call('HLEN', E)
  if h > 0 then
    cinc('emaps', -h)
    call('RENAME', E, P .. 'd' .. id)
  end
  call('HSET', K_Z, id, 0)
  flush_counts()
  return dropped
end

-- The id of pod `name` while it is live. A pod quiet for the TTL is gone (lookups skip it):
-- with `forget` (a write) it is unregistered at once, so that its old entries never come back
-- with its next write (the writers' maintenance may not have purged it yet, e.g. when no
-- writer ran meanwhile); reads only do not see it.
local CHECKED = {}
local function current_id(name, forget)
  local id = live_id(name)
  if not id or CHECKED[id] then return id end
  if alive(call('HGET', K_L, id)) then
    CHECKED[id] = true
    return id
  end
  if forget then unregister(name, id) end
  return nil
end

local function register(name)
  local id = current_id(name, true)
  if id then return id end
  local head = call('LINDEX', K_F, 0)
  if head then
    local fid, after = string.match(head, '^(%d+):(%d+)$')
    if fid and tonumber(after) <= NOW then
      call('LPOP', K_F)
      id = tonumber(fid)
    end
  end
  if not id then id = call('HINCRBY', K_C, 'nextid', 1) end
  call('HSET', K_R, name, id)
  call('HSET', K_N, id, name)
  call('HSET', K_M, id, '0,0,0,-1,0')
  call('HSET', K_PE, id, 0)
  IDS[name] = id
  LIVE[id] = true
  CHECKED[id] = true
  return id
end

local TIDS = {}
local function tier_id(name, create)
  local t = cached_num(TIDS, K_T, name)
  if t then return t end
  if not create then return nil end
  local n = call('HLEN', K_T)
  if n >= 16 then
    return nil, 'KVAWARE too many distinct KV-cache tiers (max 16): ' .. name
  end
  call('HSET', K_T, name, n)
  TIDS[name] = n
  return n
end

-- tier names by tier id + 1
local function tier_names()
  local tiers = {}
  local tl = call('HGETALL', K_T)
  for i = 1, #tl, 2 do tiers[tonumber(tl[i + 1]) + 1] = tl[i] end
  return tiers
end

-- bulk reads and writes ------------------------------------------------------------------

local function hmget(key, fields)
  local out = {}
  for c0 = 1, #fields, CHUNK do
    local got = call('HMGET', key, unpack(fields, c0, min(#fields, c0 + CHUNK - 1)))
    for j = 1, #got do out[c0 + j - 1] = got[j] end
  end
  return out
end

-- Block values read or written by this call: name -> value (false: no such block). Writes go
-- to the cache and reach Redis in one MSET (and one DEL) at the end of the call.
local BC = {}
local DIRTY = {}

local function blocks_load(names)
  local miss = {}
  for i = 1, #names do
    local k = names[i]
    if BC[k] == nil then
      BC[k] = false
      miss[#miss + 1] = k
    end
  end
  for c0 = 1, #miss, CHUNK do
    local got = call('MGET', unpack(miss, c0, min(#miss, c0 + CHUNK - 1)))
    for j = 1, #got do BC[miss[c0 + j - 1]] = got[j] end
  end
end

local function block_put(name, v)
  BC[name] = v
  DIRTY[name] = true
end

local function flush_blocks()
  local sets, dels = {}, {}
  for k in pairs(DIRTY) do
    local v = BC[k]
    if v then
      sets[#sets + 1] = k
      sets[#sets + 1] = v
    else
      dels[#dels + 1] = k
    end
  end
  for i = 1, #sets, CHUNK do call('MSET', unpack(sets, i, min(#sets, i + CHUNK - 1))) end
  for i = 1, #dels, CHUNK do call('DEL', unpack(dels, i, min(#dels, i + CHUNK - 1))) end
  BC, DIRTY = {}, {}
end

-- block values ---------------------------------------------------------------------------

local function enc(id, tier, cnt)
  if tier == 0 and cnt == 1 and id < 128 then return char(id) end
  local w = 1
  if id >= 65536 then w = 3 elseif id >= 256 then w = 2 end
  local c = 0
  if cnt > 1 then c = 1 end
  local s = char(128 + (w - 1) * 32 + c * 16 + tier)
  if w == 1 then
    s = s .. char(id)
  elseif w == 2 then
    s = s .. char(floor(id / 256), id % 256)
  else
    s = s .. char(floor(id / 65536), floor(id / 256) % 256, id % 256)
  end
  if c == 1 then s = s .. char(cnt) end
  return s
end

-- the id of the multi-byte record at byte `i` of `v` (header byte `b`), and its id width
local function rec_id(v, i, b)
  local w = floor((b - 128) / 32) + 1
  local id = byte(v, i + 1)
  if w > 1 then id = id * 256 + byte(v, i + 2) end
  if w > 2 then id = id * 256 + byte(v, i + 3) end
  return id, w
end

-- records of a value from byte `i`: list of {id, tier, count}
local function parse(v, i)
  local recs = {}
  local n = #v
  while i <= n do
    local b = byte(v, i)
    if b < 128 then
      recs[#recs + 1] = { b, 0, 1 }
      i = i + 1
    else
      local id, w = rec_id(v, i, b)
      local c = floor(b / 16) % 2
      local cnt = 1
      if c == 1 then cnt = byte(v, i + w + 1) end
      recs[#recs + 1] = { id, b % 16, cnt }
      i = i + 1 + w + c
    end
  end
  return recs
end

local function serialize(recs)
  local out = {}
  for i = 1, #recs do
    local r = recs[i]
    out[i] = enc(r[1], r[2], r[3])
  end
  return concat(out)
end

-- holder id -> tier mask, from the records part of a value
local function holders(hv)
  local t = {}
  local i, n = 1, #hv
  while i <= n do
    local b = byte(hv, i)
    if b < 128 then
      t[b] = bor(t[b] or 0, 1)
      i = i + 1
    else
      local id, w = rec_id(hv, i, b)
      t[id] = bor(t[id] or 0, lshift(1, b % 16))
      i = i + 1 + w + floor(b / 16) % 2
    end
  end
  return t
end

-- drop the records of `ids` (a set) from a record list; returns the kept list
local function without(recs, ids)
  local out = {}
  for i = 1, #recs do
    if not ids[recs[i][1]] then out[#out + 1] = recs[i] end
  end
  return out
end

-- block `bk` (value `v`) keeps records `recs`: its header and them, or nothing when none
local function block_keep(bk, v, recs)
  if #recs == 0 then
    block_put(bk, false)
    cinc('blocks', -1)
  else
    block_put(bk, sub(v, 1, 3) .. serialize(recs))
  end
end

-- drop the records of `ids` (a set) at block `bk` (loaded in the block cache); returns whether
-- any went
local function block_drop(bk, ids)
  local v = BC[bk]
  if not v then return false end
  local recs = parse(v, 4)
  local kept = without(recs, ids)
  if #kept == #recs then return false end
  block_keep(bk, v, kept)
  return true
end

-- at most `pcs` live pods per block: the oldest holders other than `keep` go first
local function limit_holders(recs, keep, pcs)
  local order, seen = {}, {}
  local dead = {}
  for i = 1, #recs do
    local id = recs[i][1]
    if not seen[id] then
      seen[id] = true
      if is_live(id) or id == keep then order[#order + 1] = id else dead[id] = true end
    end
  end
  local excess = #order - pcs
  local victims = dead
  for i = 1, #order do
    if excess <= 0 then break end
    local id = order[i]
    if id ~= keep then
      victims[id] = true
      excess = excess - 1
      drop_entry(id)
    end
  end
  return without(recs, victims)
end

-- one more reference of (id, tier) at block `bk` (current value `v` or false); `fresh` is
-- the value of a block created now, `s2` its stamp. Returns the new value, blocks added,
-- entries added.
local function block_add(bk, v, id, tid, fresh, s2)
  if not v then
    if QUEUE then QBUF[#QBUF + 1] = sub(bk, -8) .. s2 end
    return fresh, 1, 1
  end
  local ref = 0
  if byte(v, 1) >= 128 then ref = 128 end
  -- NOTE: the common case needs no parsing: one-byte records only, and a newcomer of the
  -- default tier appends its byte
  if tid == 0 and id < 128 and PCS == 0 and not find(v, PLAIN_NOT, 4)
      and not find(v, char(id), 4, true) then
    return char(ref + EPOCH) .. sub(v, 2) .. char(id), 0, 1
  end
  local recs = parse(v, 4)
  local found, held = nil, false
  for i = 1, #recs do
    local r = recs[i]
    if r[1] == id then
      held = true
      if r[2] == tid then found = r end
    end
  end
  if found then
    found[3] = min(found[3] + 1, 255)
  else
    recs[#recs + 1] = { id, tid, 1 }
  end
  local de = 0
  if not held then
    de = 1
    if PCS > 0 then recs = limit_holders(recs, id, PCS) end
  end
  return char(ref + EPOCH) .. sub(v, 2, 3) .. serialize(recs), 0, de
end

-- one reference less of (id, tier) at block `bk` (loaded in the block cache); returns whether
-- `id` still holds it at some tier
local function block_dec(bk, id, tid)
  local v = BC[bk]
  if not v then return false end
  if tid == 0 and id < 128 and not find(v, PLAIN_NOT, 4) then
    -- one-byte records only: the pod's is its single default-tier reference
    local p = find(v, char(id), 4, true)
    if not p then return false end
    drop_entry(id)
    if #v == 4 then
      block_put(bk, false)
      cinc('blocks', -1)
    else
      block_put(bk, sub(v, 1, p - 1) .. sub(v, p + 1))
    end
    return false
  end
  local recs = parse(v, 4)
  local idx, held = nil, false
  for i = 1, #recs do
    local r = recs[i]
    if r[1] == id then
      if tid ~= nil and r[2] == tid then idx = i else held = true end
    end
  end
  if not idx then return held end
  local r = recs[idx]
  if r[3] > 1 then
    r[3] = r[3] - 1
    held = true
  else
    table.remove(recs, idx)
  end
  if not held then
    drop_entry(id)
  end
  block_keep(bk, v, recs)
  return held
end

-- whether block value `v` holds a record of (id, tier)
local function holds_at(v, id, tid)
  if id < 128 and not find(v, PLAIN_NOT, 4) then
    return tid == 0 and find(v, char(id), 4, true) ~= nil
  end
  local recs = parse(v, 4)
  for i = 1, #recs do
    local r = recs[i]
    if r[1] == id and r[2] == tid then return true end
  end
  return false
end

local function evict_block(bk, v)
  local recs = parse(v, 4)
  local seen = {}
  for i = 1, #recs do
    local id = recs[i][1]
    if not seen[id] then
      seen[id] = true
      if is_live(id) then
        drop_entry(id)
      end
    end
  end
  call('DEL', bk)
  cinc('blocks', -1)
end

-- the next entry of the block queue (nil once empty), its block's name and value (false when
-- the block is gone or the entry is stale: the block was created again since)
local function queue_pop()
  local e = call('LPOP', K_Q)
  if not e then return nil end
  local bk = PB .. sub(e, 1, 8)
  local v = call('GET', bk)
  if v and sub(v, 2, 3) ~= sub(e, 9, 10) then v = false end
  return e, bk, v
end

local function counter(f)
  return tonumber(call('HGET', K_C, f) or 0)
end

-- CLOCK over the block queue until the shard is 1% under `size` entries
local function evict_to(size)
  if size <= 0 then return end
  flush_counts()
  local entries = counter('entries')
  if entries <= size then return end
  local target = size - max(1, floor(size / 100))
  local guard = 2 * call('LLEN', K_Q) + 16
  while entries > target and guard > 0 do
    guard = guard - 1
    local e, bk, v = queue_pop()
    if not e then break end
    if v then
      local h = byte(v, 1)
      if h >= 128 then
        call('SET', bk, char(h - 128) .. sub(v, 2))
        call('RPUSH', K_Q, e)
      else
        local before = DC.entries or 0
        evict_block(bk, v)
        cinc('evictions', 1)
        entries = entries + (DC.entries or 0) - before
      end
    end
  end
  flush_counts()
end

-- keys held in an engine-map value: 8 bytes each, then (on a cluster, when the engine block's
-- last key lives in another shard) a zero byte and that last key
local function nlocal(val)
  local n = #val
  if n % 8 == 0 then return n / 8 end
  return (n - 9) / 8
end

-- Engine hashes of pod `id` that come back with other keys (`cur`: their current engine-map
-- values, `new`: the new ones, both by position; `keys_of(g)`: the new local keys, 8 bytes
-- each) move to them: the pod's records at old local keys that are not among the new ones go,
-- or removals and purges, which walk the engine map, would never reach them (and a pod given
-- the id later would inherit them).
local function move_old(id, cur, new, keys_of)
  local olds = nil
  for g = 1, #new do
    local o = cur[g]
    if o and o ~= new[g] then
      local keep = {}
      local nk = keys_of(g)
      for k = 1, #nk / 8 do keep[sub(nk, 8 * k - 7, 8 * k)] = true end
      for k = 1, nlocal(o) do
        local k8 = sub(o, 8 * k - 7, 8 * k)
        if not keep[k8] then
          olds = olds or {}
          olds[#olds + 1] = PB .. k8
        end
      end
    end
  end
  if not olds then return end
  blocks_load(olds)
  local ids = { [id] = true }
  for i = 1, #olds do
    if block_drop(olds[i], ids) then
      drop_entry(id)
    end
  end
end

-- engine-hash groups of a write: calls fn(eh, keys) for each run of equal engine hashes
local function groups(kb, eb, fn)
  local n = #kb / 8
  local i = 1
  while i <= n do
    local o = 8 * i
    local eh
    if eb == '' then eh = sub(kb, o - 7, o) else eh = sub(eb, o - 7, o) end
    local j = i
    if eb ~= '' then
      while j < n and sub(eb, 8 * j + 1, 8 * j + 8) == eh do j = j + 1 end
    end
    fn(eh, sub(kb, o - 7, 8 * j))
    i = j + 1
  end
end

-- speculative records: id (3 bytes) + deadline in ms (6 bytes)
local function enc_spec(id, dl)
  return char(floor(id / 65536) % 256, floor(id / 256) % 256, id % 256,
    floor(dl / 1099511627776) % 256, floor(dl / 4294967296) % 256, floor(dl / 16777216) % 256,
    floor(dl / 65536) % 256, floor(dl / 256) % 256, dl % 256)
end

local function dec_spec(sv, i)
  local a, b, c, d1, d2, d3, d4, d5, d6 = byte(sv, i, i + 8)
  local id = (a * 256 + b) * 256 + c
  local dl = ((((d1 * 256 + d2) * 256 + d3) * 256 + d4) * 256 + d5) * 256 + d6
  return id, dl
end

local function spec_holders(sv)
  local t = {}
  for i = 1, #sv - 8, 9 do
    local id, dl = dec_spec(sv, i)
    if dl > NOW then t[id] = true end
  end
  return t
end

-- names of the pods that wrote within the TTL
local function live_names()
  local ids = ids_by_liveness(true)
  local out = {}
  for c0 = 1, #ids, CHUNK do
    local names = call('HMGET', K_N, unpack(ids, c0, min(#ids, c0 + CHUNK - 1)))
    for i = 1, #names do
      if names[i] then out[#out + 1] = names[i] end
    end
  end
  return out
end

-- writes ---------------------------------------------------------------------------------

local TOUCHED = {}

-- Write ids already applied, per writer: one bitmap of 65,536 tokens per key, kept an hour
-- after its last write. A writer sends a write again when it did not get the answer (a
-- timeout, a dropped connection), not knowing whether it was applied; applying it twice would
-- count references twice.
local DEDUP_MS = 3600000
local DEDUP_SEEN = {}
local function first_time(writer, token)
  if not writer or writer == '' or not token or token == '' then return true end
  local t = tonumber(token)
  local key = P .. 'x' .. writer .. ':' .. floor(t / 65536)
  if call('SETBIT', key, t % 65536, 1) == 1 then return false end
  if not DEDUP_SEEN[key] then
    DEDUP_SEEN[key] = true
    call('PEXPIRE', key, DEDUP_MS)
  end
  return true
end

-- (engine hash, value) pairs `kv` into engine map `E`; returns the fields added
local function emap_set(E, kv)
  local added = 0
  for i = 1, #kv, CHUNK do
    added = added + call('HSET', E, unpack(kv, i, min(#kv, i + CHUNK - 1)))
  end
  cinc('emaps', added)
  return added
end

-- the value of a block created now with one reference of (id, tier), and its stamp (2 bytes)
local function fresh_value(id, tid)
  local st = stamp()
  local s2 = char(floor(st / 256), st % 256)
  return char(EPOCH) .. s2 .. enc(id, tid, 1), s2
end

-- one reference of (id, tier) at each block `names[i]` (key `keys[i]`, 8 bytes)
local function add_refs(names, keys, id, tid)
  blocks_load(names)
  local fresh, s2 = fresh_value(id, tid)
  local db, de = 0, 0
  for i = 1, #names do
    local bk = names[i]
    local v = BC[bk]
    if v then
      local nv, _, e1 = block_add(bk, v, id, tid, fresh, s2)
      BC[bk] = nv
      de = de + e1
    else
      if QUEUE then QBUF[#QBUF + 1] = keys[i] .. s2 end
      BC[bk] = fresh
      db = db + 1
      de = de + 1
    end
    DIRTY[bk] = true
  end
  count_added(id, db, de)
end

-- A store of `kb` (keys, 8 bytes each) with engine hashes `eb` ('' = the keys) at tier
-- `tname`. `x`: '1' when the keys are distinct with one engine hash each (the common case),
-- else '0' followed by (engine hash, last key) pairs of engine blocks whose last key lives in
-- another shard. `new_only`: engine hashes the pod already holds at the tier (same keys) get
-- no new reference. Returns the engine hashes skipped so, concatenated.
local function w_add(name, tname, kb, eb, x, new_only)
  local n = #kb / 8
  if n == 0 then return '' end
  local tid, err = tier_id(tname, true)
  if not tid then return err end
  local id = register(name)
  TOUCHED[id] = true
  local E = emap_key(id)
  local plain = byte(x, 1) == 49
  if plain and not new_only then
    -- the hot path: distinct keys, one engine hash each
    local kv, names = {}, {}
    local j = 0
    for i = 1, n do
      local o = 8 * i
      local k = sub(kb, o - 7, o)
      if eb == '' then kv[j + 1] = k else kv[j + 1] = sub(eb, o - 7, o) end
      kv[j + 2] = k
      j = j + 2
      names[i] = PB .. k
    end
    local ehs, vals = {}, {}
    for i = 1, n do
      ehs[i] = kv[2 * i - 1]
      vals[i] = kv[2 * i]
    end
    local cur = hmget(E, ehs)
    local added = emap_set(E, kv)
    if added < n then move_old(id, cur, vals, function(g) return vals[g] end) end
    add_refs(names, vals, id, tid)
    return ''
  end
  local gehs, gvals, gkeys = {}, {}, nil
  if plain then
    for i = 1, n do
      local o = 8 * i
      local k = sub(kb, o - 7, o)
      gvals[i] = k
      if eb == '' then gehs[i] = k else gehs[i] = sub(eb, o - 7, o) end
    end
    gkeys = gvals
  else
    gkeys = {}
    local foreign = {}
    local fb = sub(x, 2)
    for i = 1, #fb - 15, 16 do foreign[sub(fb, i, i + 7)] = sub(fb, i + 8, i + 15) end
    groups(kb, eb, function(eh, keys)
      local g = #gehs + 1
      gehs[g] = eh
      gkeys[g] = keys
      local f = foreign[eh]
      if f then gvals[g] = keys .. '\0' .. f else gvals[g] = keys end
    end)
  end
  local ng = #gehs
  local skip, skipped = nil, {}
  local cur = hmget(E, gehs)
  if new_only then
    local names, gi = {}, {}
    for g = 1, ng do
      if cur[g] == gvals[g] then
        names[#names + 1] = PB .. sub(gkeys[g], 1, 8)
        gi[#gi + 1] = g
      end
    end
    if #names > 0 then
      blocks_load(names)
      for j = 1, #names do
        local v = BC[names[j]]
        if v and holds_at(v, id, tid) then
          skip = skip or {}
          skip[gi[j]] = true
          skipped[#skipped + 1] = gehs[gi[j]]
        end
      end
    end
  end
  local kv, names, key8 = {}, {}, {}
  for g = 1, ng do
    if not (skip and skip[g]) then
      kv[#kv + 1] = gehs[g]
      kv[#kv + 1] = gvals[g]
      local ks = gkeys[g]
      if plain then
        names[#names + 1] = PB .. ks
        key8[#key8 + 1] = ks
      else
        for k = 1, #ks / 8 do
          local k8 = sub(ks, 8 * k - 7, 8 * k)
          names[#names + 1] = PB .. k8
          key8[#key8 + 1] = k8
        end
      end
    end
  end
  if #kv == 0 then return concat(skipped) end
  emap_set(E, kv)
  move_old(id, cur, gvals, function(g) return gkeys[g] end)
  add_refs(names, key8, id, tid)
  return concat(skipped)
end

-- the engine hashes of `eb` and their engine-map values (false when unknown)
local function emap_values(E, eb)
  local ehs = {}
  for i = 1, #eb / 8 do ehs[i] = sub(eb, 8 * i - 7, 8 * i) end
  return ehs, hmget(E, ehs)
end

-- the block names of engine-map values, appended to `names`
local function value_blocks(vals, n, names)
  for i = 1, n do
    local val = vals[i]
    if val then
      if #val == 8 then
        names[#names + 1] = PB .. val
      else
        for k = 1, nlocal(val) do names[#names + 1] = PB .. sub(val, 8 * k - 7, 8 * k) end
      end
    end
  end
  return names
end

-- One reference less per engine hash of `eb` at tier `tname`; an engine hash is forgotten
-- once the pod holds none of its keys at any tier. Returns a '0'/'1' string: known or not.
local function w_remove(name, tname, eb)
  local n = #eb / 8
  local id = current_id(name, true)
  if not id then return string.rep('0', n) end
  TOUCHED[id] = true
  local tid = tier_id(tname, false)
  local E = emap_key(id)
  local ehs, vals = emap_values(E, eb)
  local names = {}
  for i = 1, n do
    local val = vals[i]
    if val and #val == 8 then names[i] = PB .. val end
  end
  local all = value_blocks(vals, n, {})
  blocks_load(all)
  local bits, dels, gone = {}, {}, {}
  local plain_ok = tid == 0 and id < 128
  local mine = char(id)
  local gone_entries, gone_blocks = 0, 0
  for i = 1, n do
    local val, eh = vals[i], ehs[i]
    if val and not gone[eh] then
      bits[i] = '1'
      local still = false
      local bk = names[i]
      if bk then
        local v = BC[bk]
        if v and plain_ok and not find(v, PLAIN_NOT, 4) then
          -- one-byte records only: the pod's is its single default-tier reference
          local p = find(v, mine, 4, true)
          if p then
            gone_entries = gone_entries + 1
            if #v == 4 then
              BC[bk] = false
              gone_blocks = gone_blocks + 1
            else
              BC[bk] = sub(v, 1, p - 1) .. sub(v, p + 1)
            end
            DIRTY[bk] = true
          end
        else
          still = block_dec(bk, id, tid)
        end
      else
        for k = 1, nlocal(val) do
          if block_dec(PB .. sub(val, 8 * k - 7, 8 * k), id, tid) then still = true end
        end
      end
      if not still then
        gone[eh] = true
        dels[#dels + 1] = eh
      end
    else
      bits[i] = '0'
    end
  end
  if gone_entries > 0 then
    cinc('entries', -gone_entries)
    ped(id, -gone_entries)
    cinc('blocks', -gone_blocks)
  end
  local deleted = 0
  for i = 1, #dels, CHUNK do
    deleted = deleted + call('HDEL', E, unpack(dels, i, min(#dels, i + CHUNK - 1)))
  end
  cinc('emaps', -deleted)
  return concat(bits)
end

-- One reference at tier `tname` for the keys of each known engine hash of `eb` (offload
-- stores). Returns a '0'/'1' string: known or not.
local function w_add_tier(name, tname, eb)
  local n = #eb / 8
  local id = current_id(name, true)
  if not id then return string.rep('0', n) end
  local tid, err = tier_id(tname, true)
  if not tid then return err end
  TOUCHED[id] = true
  local _, vals = emap_values(emap_key(id), eb)
  local bits = {}
  for i = 1, n do
    if vals[i] then bits[i] = '1' else bits[i] = '0' end
  end
  local names = value_blocks(vals, n, {})
  blocks_load(names)
  local fresh, s2 = fresh_value(id, tid)
  local db, de = 0, 0
  for i = 1, #names do
    local bk = names[i]
    local nv, b1, e1 = block_add(bk, BC[bk], id, tid, fresh, s2)
    block_put(bk, nv)
    db = db + b1
    de = de + e1
  end
  count_added(id, db, de)
  return concat(bits)
end

-- operations -----------------------------------------------------------------------------

if op == 'lookup' then
  -- ARGV[4]: the prompt's block key names (the block prefix and 8 bytes each), so that the
  -- walk makes one string per key, not two
  local kb, all, size = ARGV[4], ARGV[5] == '1', tonumber(ARGV[6])
  local KL = #PB + 8
  local n = #kb / KL
  local active, nact = {}, 0
  if all then
    local ids = ids_by_liveness(true)
    if #ids > 0 then
      local names = call('HMGET', K_N, unpack(ids))
      for i = 1, #ids do
        if names[i] then
          active[tonumber(ids[i])] = { names[i], 0, 0, {} }
          nact = nact + 1
        end
      end
    end
  elseif #ARGV > 6 then
    local names = {}
    for i = 7, #ARGV do names[#names + 1] = ARGV[i] end
    local ids = call('HMGET', K_R, unpack(names))
    local got, gotn = {}, {}
    for i = 1, #names do
      if ids[i] then
        got[#got + 1] = ids[i]
        gotn[#gotn + 1] = names[i]
      end
    end
    if #got > 0 then
      local ls = nil
      if TTL > 0 then ls = call('HMGET', K_L, unpack(got)) end
      for i = 1, #got do
        if not ls or alive(ls[i]) then
          local id = tonumber(got[i])
          if not active[id] then
            active[id] = { gotn[i], 0, 0, {} }
            nact = nact + 1
          end
        end
      end
    end
  end
  if nact == 0 or n == 0 then return cmsgpack.pack({}) end

  local spec_on = call('EXISTS', K_SA) == 1
  -- NOTE: a walked block gets its CLOCK ref bit only once the shard is half full: recency
  -- matters to eviction only then, and below it a lookup writes nothing but the touch
  -- epoch (once per TTL/4) that keeps walked blocks from expiring.
  local pressure = size > 0 and counter('entries') * 2 >= size
  local NONE = {}
  local pv, psv, phv = NONE, NONE, NONE
  local pos, chunk, stopped = 0, 8, false
  local tk, tv = {}, {}
  local newv = nil
  local done = {}
  while pos < n and not stopped do
    local cn = min(chunk, n - pos)
    local ks = {}
    local base = pos * KL
    for j = 1, cn do
      local o = base + KL * j
      ks[j] = sub(kb, o - KL + 1, o)
    end
    local vals = call('MGET', unpack(ks))
    local svals = nil
    if spec_on then
      local sk = {}
      for j = 1, cn do sk[j] = PS .. sub(ks[j], KL - 7) end
      svals = call('MGET', unpack(sk))
    end
    for j = 1, cn do
      local v = vals[j]
      local sv = false
      if svals then sv = svals[j] end
      if v ~= pv or sv ~= psv then
        local hv = false
        if v then hv = sub(v, 4) end
        if hv ~= phv or sv ~= psv then
          local h = EMPTY
          if hv then h = holders(hv) end
          local sh = EMPTY
          if sv then sh = spec_holders(sv) end
          local any, drops = false, nil
          for id, st in pairs(active) do
            local mk = h[id]
            if not mk and sh[id] then mk = SPEC end
            if mk then
              any = true
              if mk ~= st[2] then
                if st[2] ~= 0 and pos > st[3] then
                  local r = st[4]
                  r[#r + 1] = st[3]
                  r[#r + 1] = pos
                  r[#r + 1] = st[2]
                end
                st[2] = mk
                st[3] = pos
              end
            else
              drops = drops or {}
              drops[#drops + 1] = id
            end
          end
          if not any then
            stopped = true
            break
          end
          if drops then
            for d = 1, #drops do
              local st = active[drops[d]]
              st[5] = pos
              done[#done + 1] = st
              active[drops[d]] = nil
            end
          end
          phv = hv
        end
        pv, psv = v, sv
        newv = nil
        if v then
          local h = byte(v, 1)
          local want = EPOCH
          if pressure or h >= 128 then want = want + 128 end
          if h ~= want then newv = char(want) .. sub(v, 2) end
        end
      end
      if newv then
        tk[#tk + 1] = ks[j]
        tv[#tv + 1] = newv
      end
      pos = pos + 1
    end
    chunk = min(chunk * 4, 2048)
  end
  for _, st in pairs(active) do
    st[5] = pos
    done[#done + 1] = st
  end
  if #tk > 0 then
    local sets = {}
    for i = 1, #tk do
      sets[2 * i - 1] = tk[i]
      sets[2 * i] = tv[i]
    end
    for i = 1, #sets, 2000 do call('MSET', unpack(sets, i, min(#sets, i + 1999))) end
  end

  local tiers = tier_names()
  local out = { tiers }
  for i = 1, #done do
    local st = done[i]
    local run = st[5]
    if run > 0 then
      if st[2] ~= 0 and run > st[3] then
        local r = st[4]
        r[#r + 1] = st[3]
        r[#r + 1] = run
        r[#r + 1] = st[2]
      end
      out[#out + 1] = st[1]
      out[#out + 1] = run
      out[#out + 1] = st[4]
    end
  end
  return cmsgpack.pack(out)

elseif op == 'w' then
  -- a batch of writes in call order: ARGV[4] = size bound of the shard, ARGV[5] = pods per
  -- block (0 = no limit), ARGV[6] = the writer's id, then seven arguments per write: kind
  -- ('a' add, 'n' add_new, 'r' remove, 't' add_tier), pod, tier, keys, engine hashes, flags,
  -- token. Returns one result per write (skipped engine hashes, or a known-bits string), or a
  -- 'KVAWARE ...' string for a refused one. A write already applied (same writer and token)
  -- is skipped: it answers no skipped hashes, or no known ones.
  local size = tonumber(ARGV[4])
  PCS = tonumber(ARGV[5])
  local writer = ARGV[6]
  -- NOTE: the block queue serves eviction and expiry; with neither it is not kept
  QUEUE = QUEUE or size > 0
  local out = {}
  local a, s, na = 7, 0, #ARGV
  while a + 6 <= na do
    local kind = ARGV[a]
    local r
    if not first_time(writer, ARGV[a + 6]) then
      if kind == 'r' or kind == 't' then r = string.rep('0', #ARGV[a + 4] / 8) else r = '' end
    elseif kind == 'a' or kind == 'n' then
      r = w_add(ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], kind == 'n')
    elseif kind == 'r' then
      r = w_remove(ARGV[a + 1], ARGV[a + 2], ARGV[a + 4])
    elseif kind == 't' then
      r = w_add_tier(ARGV[a + 1], ARGV[a + 2], ARGV[a + 4])
    else
      r = 'KVAWARE unknown write ' .. tostring(kind)
    end
    s = s + 1
    out[s] = r
    a = a + 7
  end
  flush_blocks()
  for id in pairs(TOUCHED) do refresh_pod(id) end
  flush_counts()
  evict_to(size)
  return out

elseif op == 'resolve' then
  local id = current_id(ARGV[4], false)
  if not id then return false end
  local val = call('HGET', emap_key(id), ARGV[5])
  if not val then return false end
  return sub(val, -8)

elseif op == 'refs' then
  -- the pod's references per engine hash and tier (read at the first key of the engine block
  -- in this shard): tier names (msgpack), engine hashes (8 bytes each), then a tier id byte
  -- and a count byte for each
  local id = current_id(ARGV[4], false)
  if not id then return {} end
  local all = call('HGETALL', emap_key(id))
  local tiers = tier_names()
  local names = {}
  for i = 2, #all, 2 do names[#names + 1] = PB .. sub(all[i], 1, 8) end
  blocks_load(names)
  local ehs, tcs = {}, {}
  for i = 1, #names do
    local v = BC[names[i]]
    if v then
      local recs = parse(v, 4)
      for j = 1, #recs do
        local r = recs[j]
        if r[1] == id then
          ehs[#ehs + 1] = all[2 * i - 1]
          tcs[#tcs + 1] = char(r[2], r[3])
        end
      end
    end
  end
  return { cmsgpack.pack(tiers), concat(ehs), concat(tcs) }

elseif op == 'spec' then
  local name, kb, sttl = ARGV[4], ARGV[5], tonumber(ARGV[6])
  local n = #kb / 8
  if n == 0 or sttl <= 0 then return 0 end
  local id = register(name)
  local m = meta_get(id)
  local dl = NOW + sttl
  -- NOTE: blocks the pod already holds for real need no speculative record: the walk
  -- finds them anyway; only the part from its first missing block is written.
  local pos, chunk, held, phv = 0, 8, true, nil
  while pos < n and held do
    local cn = min(chunk, n - pos)
    local ks = {}
    for j = 1, cn do
      local o = (pos + j) * 8
      ks[j] = PB .. sub(kb, o - 7, o)
    end
    local vals = call('MGET', unpack(ks))
    for j = 1, cn do
      local v = vals[j]
      if not v then
        held = false
        break
      end
      local hv = sub(v, 4)
      if hv ~= phv then
        held = holders(hv)[id] ~= nil
        phv = hv
      end
      if not held then break end
      pos = pos + 1
    end
    chunk = min(chunk * 4, 2048)
  end
  local written = 0
  for c0 = pos, n - 1, 512 do
    local cn = min(512, n - c0)
    local sk = {}
    for j = 1, cn do
      local o = (c0 + j) * 8
      sk[j] = PS .. sub(kb, o - 7, o)
    end
    local svals = call('MGET', unpack(sk))
    for j = 1, cn do
      local sv = svals[j]
      local out, last, mine = {}, dl, dl
      if sv then
        for i = 1, #sv - 8, 9 do
          local rid, rdl = dec_spec(sv, i)
          if rdl > NOW then
            if rid == id then
              mine = max(mine, rdl)
            else
              out[#out + 1] = sub(sv, i, i + 8)
              last = max(last, rdl)
            end
          end
        end
      end
      out[#out + 1] = enc_spec(id, mine)
      last = max(last, mine)
      call('SET', sk[j], concat(out), 'PX', last - NOW)
      written = written + 1
    end
  end
  if call('PTTL', K_SA) < sttl then call('SET', K_SA, '1', 'PX', sttl) end
  if written > 0 then
    call('INCRBY', K_SC, written)
    if call('PTTL', K_SC) < sttl then call('PEXPIRE', K_SC, sttl) end
  end
  m.sd = max(m.sd, dl)
  refresh_pod(id)
  meta_put(id, m)
  return written

elseif op == 'purge' then
  -- by name (ARGV[6], ARGV[7]: writer and token, as for 'w'), or by id (a writer purging a
  -- pod gone quiet: only if it is still quiet)
  local name, id = ARGV[4], nil
  if name ~= '' then
    if not first_time(ARGV[6], ARGV[7]) then return { 0, 0 } end
    id = live_id(name)
  else
    id = tonumber(ARGV[5])
    name = call('HGET', K_N, id)
    if not name or alive(call('HGET', K_L, id)) then return { 0, 0 } end
    if tonumber(call('HGET', K_R, name)) ~= id then return { 0, 0 } end
  end
  if not id then return { 0, 0 } end
  return { unregister(name, id), id }

elseif op == 'purge_step' then
  -- drop a purged pod's records from the blocks of one page of its engine map (HSCAN)
  local id, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
  local cur = call('HGET', K_Z, id)
  if not cur then return 0 end
  local D = P .. 'd' .. id
  local cursor, items = '0', EMPTY
  if call('EXISTS', D) == 1 then
    local res = call('HSCAN', D, cur, 'COUNT', budget)
    cursor, items = res[1], res[2]
  end
  local names = {}
  for i = 2, #items, 2 do
    local val = items[i]
    for k = 1, nlocal(val) do names[#names + 1] = PB .. sub(val, 8 * k - 7, 8 * k) end
  end
  blocks_load(names)
  local gone = { [id] = true }
  for i = 1, #names do
    block_drop(names[i], gone)
  end
  flush_blocks()
  if cursor == '0' then
    call('UNLINK', D)
    local m = meta_get(id)
    call('HDEL', K_Z, id)
    call('HDEL', K_M, id)
    call('RPUSH', K_F, id .. ':' .. max(NOW, m.sd))
    flush_counts()
    return 0
  end
  call('HSET', K_Z, id, cursor)
  flush_counts()
  return 1

elseif op == 'maint' then
  -- expiry sweep over the block queue, then the pods gone quiet and unfinished purges
  local interval, size = tonumber(ARGV[4]), tonumber(ARGV[5])
  local qlen = call('LLEN', K_Q)
  local blocks = counter('blocks')
  local budget = 0
  if TTL > 0 then budget = math.ceil(qlen * interval / PERIOD) + 16 end
  if qlen > 2 * blocks + 1024 then budget = max(budget, qlen - 2 * blocks) end
  budget = min(budget, qlen, 20000)
  local expired = 0
  for _ = 1, budget do
    local e, bk, v = queue_pop()
    if not e then break end
    if v then
      if TTL > 0 and (EPOCH - byte(v, 1) % 128) % 128 >= EXPIRE_PERIODS then
        evict_block(bk, v)
        expired = expired + 1
      else
        call('RPUSH', K_Q, e)
      end
    end
  end
  if expired > 0 then cinc('expired', expired) end
  flush_counts()
  evict_to(size)
  local quiet = {}
  if TTL > 0 then
    local ids = ids_by_liveness(false)
    for i = 1, #ids do quiet[i] = tonumber(ids[i]) end
  end
  local pending = {}
  local z = call('HKEYS', K_Z)
  for i = 1, #z do pending[i] = tonumber(z[i]) end
  return cmsgpack.pack({ quiet, pending, expired })

elseif op == 'alive' then
  -- a pod that writes to other shards of a cluster is alive here too
  local id = register(ARGV[4])
  refresh_pod(id)
  return id

elseif op == 'stats' then
  local c = call('HMGET', K_C, 'entries', 'blocks', 'evictions', 'emaps', 'expired')
  local out = { live_names(), tonumber(call('GET', K_SC) or 0), call('LLEN', K_Q) }
  for i = 1, 5 do out[#out + 1] = tonumber(c[i] or 0) end
  return cmsgpack.pack(out)

elseif op == 'pods' then
  return cmsgpack.pack(live_names())
end

return redis.error_reply('KVAWARE unknown operation ' .. tostring(op))
