-- Stand-ins for Ardour's Lua bindings (ARDOUR.LuaOSC, Session, Temporal), enough to run a session
-- script's process callback; every OSC message it sends is printed as "SEND\tpath\ttypes\targs...".
-- Usage: lua5.4 ardour_standin.lua SCRIPT   (the scenario below drives it)
local descriptor
function ardour (d) descriptor = d end

local state = { sample = 0, rolling = false, bpm = 120, note_type = 4, num = 4, den = 4 }
local RATE = 48000

ARDOUR = { LuaOSC = { Address = function (url)
	return { send = function (self, path, types, ...)
		local args = {}
		for i, v in ipairs ({ ... }) do args[i] = string.format ("%.4f", v) end
		io.write ("SEND\t", url, "\t", path, "\t", types, "\t", table.concat (args, "\t"), "\n")
	end }
end } }

Session = {
	transport_sample = function (self) return state.sample end,
	transport_rolling = function (self) return state.rolling end,
	nominal_sample_rate = function (self) return RATE end,
}

local function bbt_of (sample)
	local qpm = state.bpm * 4 / state.note_type            -- quarter notes a minute
	local beats = sample / RATE * qpm / 60 * state.den / 4  -- signature beats from bar 1
	local bars = math.floor (beats / state.num)
	local rest = beats - bars * state.num
	return { bars = bars + 1, beats = math.floor (rest) + 1, ticks = math.floor ((rest % 1) * 1920 + 0.5) }
end

Temporal = {
	timepos_t = function (sample) return { sample = sample } end,
	TempoMap = { read = function () return {
		tempo_at = function (self, pos) return {
			note_types_per_minute = function () return state.bpm end,
			note_type = function () return state.note_type end } end,
		meter_at = function (self, pos) return {
			divisions_per_bar = function () return state.num end,
			note_value = function () return state.den end } end,
		bbt_at = function (self, pos) return bbt_of (pos.sample) end,
	} end },
}

dofile (arg[1])
assert (descriptor and descriptor["type"] == "session", "not a session script")
local process = factory ({ url = "osc.udp://127.0.0.1:9010" })

local function run (seconds)  -- process cycles of 1024 samples
	local cycles = math.floor (seconds * RATE / 1024)
	for _ = 1, cycles do
		if state.rolling then state.sample = state.sample + 1024 end
		process (1024)
	end
end

local function mark (what) io.write ("MARK\t", what, "\n") end
mark ("start")        run (0.5)    -- first reading: tempo, signature, stopped at 0
mark ("idle")         run (1.0)    -- nothing changes: nothing sent
state.bpm = 97        mark ("tempo")  run (0.3)
state.sample = math.floor (16 * 60 / 97 * RATE) mark ("locate") run (0.3)   -- bar 5, stopped
state.rolling = true  mark ("play")   run (2.0)    -- rolling: play once, then quiet
state.num, state.den = 6, 8 mark ("signature") run (0.3)
state.rolling = false mark ("stop")   run (0.3)
mark ("end")
