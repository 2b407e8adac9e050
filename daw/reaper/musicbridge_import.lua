-- musicbridge_import.lua: put every stem musicbridge finishes on a new track, at its place on the
-- timeline (the stem's BWF time reference: the bar where you asked for it).
--
-- Lua in REAPER has no sockets, so this script watches the done list that `musicbridge serve`
-- appends a line to for every finished stem ("<job>\t<track>\t<path>"; --done-list, default
-- SESSION_DIR/done-list.txt). Stems finished before the script started are not imported again.
--
-- Set the done list's path once (it is remembered):
--   reaper.SetExtState("musicbridge", "done_list", "/path/to/musicbridge-session/done-list.txt", true)
-- or edit DEFAULT_DONE_LIST below. Run the script from Actions > Load ReaScript; it keeps
-- watching until REAPER closes (or you terminate it from the Actions list).

local DEFAULT_DONE_LIST = (os.getenv("HOME") or ".") .. "/musicbridge-session/done-list.txt"
local INSERT_ON_NEW_TRACK = 1
local AT_BWF_OFFSET = 4096 -- "move to source preferred position (BWF start offset)"
local MODE = INSERT_ON_NEW_TRACK + AT_BWF_OFFSET

local done_list = reaper.GetExtState("musicbridge", "done_list")
if done_list == nil or done_list == "" then done_list = DEFAULT_DONE_LIST end

local function size_of(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local n = f:seek("end")
  f:close()
  return n
end

local offset = size_of(done_list) or 0 -- start at the end: only stems finished from now on
local pending = ""

local function import(track, path)
  reaper.Undo_BeginBlock()
  reaper.InsertMedia(path, MODE)
  local tr = reaper.GetSelectedTrack(0, 0) -- the new track
  if tr then reaper.GetSetMediaTrackInfo_String(tr, "P_NAME", "musicbridge " .. track, true) end
  reaper.Undo_EndBlock("musicbridge: import " .. path, -1)
  reaper.UpdateArrange()
end

local function read_new_lines()
  local size = size_of(done_list)
  if not size then return end
  if size < offset then offset, pending = 0, "" end -- a new done list (a new session)
  if size == offset then return end
  local f = io.open(done_list, "rb")
  if not f then return end
  f:seek("set", offset)
  local data = f:read("a") or ""
  f:close()
  offset = offset + #data
  pending = pending .. data
  while true do
    local nl = pending:find("\n", 1, true)
    if not nl then break end -- a line still being written waits for its newline
    local line = pending:sub(1, nl - 1)
    pending = pending:sub(nl + 1)
    local _job, track, path = line:match("^(%d+)\t([^\t]*)\t(.+)$")
    if path then import(track, path) end
  end
end

local function watch()
  read_new_lines()
  reaper.defer(watch)
end

watch()
