-- A stand-in `reaper` table that records the calls a ReaScript makes (one line each on stdout), then
-- runs the script's reaper.defer loop for a while.
-- Usage: lua5.4 reaper_standin.lua SCRIPT DONE_LIST SECONDS [INSERTS_TO_WAIT_FOR]
local script, done_list, seconds, want = arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4] or "1")
local deferred, inserts = nil, 0
local function record(...) io.write(table.concat({...}, "\t"), "\n"); io.flush() end

reaper = {
  GetExtState = function(section, key)
    if section == "musicbridge" and key == "done_list" then return done_list end
    return ""
  end,
  InsertMedia = function(path, mode)
    inserts = inserts + 1
    record("InsertMedia", path, tostring(math.tointeger(mode) or mode))
    return 1
  end,
  GetSelectedTrack = function(proj, i) return "new-track" end,
  GetSetMediaTrackInfo_String = function(tr, key, value, set)
    record("GetSetMediaTrackInfo_String", tr, key, value, tostring(set))
    return true, value
  end,
  Undo_BeginBlock = function() end,
  Undo_EndBlock = function(what, flags) end,
  UpdateArrange = function() end,
  defer = function(fn) deferred = fn end,
}

dofile(script)
record("READY")
local deadline = os.time() + seconds
while deferred and inserts < want and os.time() <= deadline do
  local fn = deferred
  deferred = nil
  fn()
  os.execute("sleep 0.05")
end
record("END", tostring(inserts))
