local current = redis.call('HGET', KEYS[1], 'v') or '0'
if current ~= ARGV[1] then
  return {0, current, redis.call('HGET', KEYS[1], 's') or ''}
end
local next = tostring(tonumber(current) + 1)
redis.call('HSET', KEYS[1], 'v', next, 's', ARGV[2])
for i = 6, #ARGV, 2 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], ARGV[i], 'e', ARGV[i + 1])
end
if KEYS[3] and ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[3], 'LT', ARGV[4], ARGV[5])
end
return {1, next, ''}
