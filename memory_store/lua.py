"""Every multi-key invariant of the store, as a Lua script: Redis runs a script atomically, so
no reader ever sees half of a change, and a worker presumed dead cannot overwrite its successor.

Each script's header says what it takes (KEYS, ARGV) and what it returns. All the keys of one
script share a Redis Cluster hash tag (one memory's, or ``{jobs}``), so it runs on one node.
Key layouts: `memory_store.redis_store` (memories) and `memory_store.jobs` (jobs).
"""

# --- memories -------------------------------------------------------------------------------

# Publishes one version, its blob with it: one script, so no failure can leave a blob that no
# version points at. The JSON is stored as sent (a Lua re-encode would turn [] into {} and round
# floats); the version is the field's name and is filled in when read.
# KEYS: the memory's meta hash, its blob. ARGV: job id ('' = none), metadata JSON, make-current
# flag ('1'/'0'), the blob. Returns {version, 1} for a new version, {version, 0} when the job
# (or the upload, for PutMemory's content key) had already published one.
PUBLISH = """
if ARGV[1] ~= '' then
  local done = redis.call('HGET', KEYS[1], 'job:' .. ARGV[1])
  if done and redis.call('HEXISTS', KEYS[1], 'v' .. done) == 1 then return {tonumber(done), 0} end
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], ARGV[4])
end
local version = redis.call('HINCRBY', KEYS[1], 'next', 1)
redis.call('HSET', KEYS[1], 'v' .. version, ARGV[2])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'current', version) end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'job:' .. ARGV[1], version) end
return {version, 1}
"""

# Deletes one version, or all; `current` moves to the newest remaining.
# KEYS: the memory's meta hash. ARGV: the version ('0' = all).
# Returns {count deleted, the blob shas no remaining version points at}.
DELETE_VERSIONS = """
local fields = redis.call('HGETALL', KEYS[1])
local versions, shas = {}, {}
for i = 1, #fields, 2 do
  local f = fields[i]
  if string.sub(f, 1, 1) == 'v' then
    local v = tonumber(string.sub(f, 2))
    versions[v] = cjson.decode(fields[i + 1])['sha256']
  end
end
local deleted, keep_shas = 0, {}
for v, sha in pairs(versions) do
  if ARGV[1] == '0' or tonumber(ARGV[1]) == v then
    redis.call('HDEL', KEYS[1], 'v' .. v)
    deleted = deleted + 1
  else
    keep_shas[sha] = true
  end
end
local orphaned = {}
for v, sha in pairs(versions) do
  if (ARGV[1] == '0' or tonumber(ARGV[1]) == v) and not keep_shas[sha] then
    table.insert(orphaned, sha); keep_shas[sha] = true
  end
end
-- (the blobs themselves go in DROP_BLOB, which checks again: a publish of the same
-- content may have claimed one in between)
local newest = 0
for v, sha in pairs(versions) do
  if not (ARGV[1] == '0' or tonumber(ARGV[1]) == v) and v > newest then newest = v end
end
if newest == 0 then
  redis.call('HDEL', KEYS[1], 'current')
else
  redis.call('HSET', KEYS[1], 'current', newest)
end
return {deleted, orphaned}
"""

# Deletes a blob unless a version still points at it.
# KEYS: the memory's meta hash, the blob. ARGV: the blob's sha256. Returns the keys deleted (0 or 1).
DROP_BLOB = """
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 1) == 'v' and cjson.decode(fields[i + 1])['sha256'] == ARGV[1] then
    return 0
  end
end
return redis.call('DEL', KEYS[2])
"""

# --- jobs -----------------------------------------------------------------------------------

# Queues a job: one script, so a job is never recorded without its stream entry (or the reverse),
# and so that no number of servers together let a tenant past its quota of jobs not yet final.
# The tenant's active set forgets, here, the jobs that have ended (or expired) since.
# KEYS: the job, the tenant's index, the stream, the counter, the tenant's active set.
# ARGV: the job id, the quota of active jobs ('0' = none), the job keys' prefix, then the
# record's field/value pairs. Returns the job's sequence number, or -(jobs active) when the
# tenant is at its quota (nothing written).
SUBMIT_JOB = """
local active = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[5])) do
  local state = redis.call('HGET', ARGV[3] .. id, 'state')
  if state == 'queued' or state == 'running' then
    active = active + 1
  else
    redis.call('SREM', KEYS[5], id)
  end
end
local limit = tonumber(ARGV[2])
if limit > 0 and active >= limit then return -active end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'seq', seq, unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
return seq
"""

# Starts an attempt. KEYS: the job. ARGV: worker, now, max attempts, retention seconds.
# Returns 'run', or 'skip' when the job must not run (final, cancelled, or out of attempts).
START_ATTEMPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'succeeded' or state == 'failed' or state == 'cancelled' then
  return 'skip'
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return 'skip'
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_at', ARGV[2], 'error',
    'gave up after ' .. ARGV[3] .. ' attempts: the workers running it died')
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return 'skip'
end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1])
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
end
return 'run'
"""

# A running worker's heartbeat for its job: re-claims the stream entry (resetting its idle
# time) only if the worker still owns the job, so a worker presumed dead cannot take it back
# from its successor. KEYS: the job, the stream. ARGV: worker, stream entry, group.
# Returns 1, or 0 when the job is no longer this worker's.
HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return 0
end
redis.call('XCLAIM', KEYS[2], ARGV[3], ARGV[1], 0, ARGV[2], 'JUSTID')
return 1
"""

# Hands a running job back to the queue (a worker told to stop, past its grace period): queued
# again with its progress, a new stream entry for the next worker, and the attempt not counted
# (the worker did not die). KEYS: the job, the stream. ARGV: worker, stream entry, group, job id,
# progress JSON. Returns 1, or 0 when the job is no longer this worker's.
HAND_BACK = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'progress', ARGV[5])
redis.call('HDEL', KEYS[1], 'worker')
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('XACK', KEYS[2], ARGV[3], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'job', ARGV[4])
return 1
"""

# Updates a running job this worker owns. KEYS: the job. ARGV: worker, then field/value pairs.
# Returns 'ok', 'cancel' (cancellation was asked for; nothing written) or 'lost' (another
# worker owns it now, or it is final).
UPDATE_JOB = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return 'lost'
end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 'cancel' end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 'ok'
"""

# Ends a running job this worker owns. KEYS: the job. ARGV: worker, retention seconds, then
# field/value pairs. Returns 'ok', or 'lost' (nothing written).
FINISH_JOB = """
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  return 'lost'
end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 'ok'
"""

# Cancels: a queued job at once; a running one is flagged for its worker.
# KEYS: the job. ARGV: now, retention seconds. Returns 'missing', 'cancelled' (it was queued),
# or the job's state (a running one now has its flag).
CANCEL_JOB = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'cancel', '1', 'finished_at', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 'cancelled'
end
if state == 'running' then redis.call('HSET', KEYS[1], 'cancel', '1') end
return state
"""
