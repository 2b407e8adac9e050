ardour {
	["type"]    = "session",
	name        = "musicbridge sync",
	category    = "Sync",
	license     = "MIT",
	author      = "musicbridge",
	description = [[Sends Ardour's tempo, time signature and transport to a musicbridge daemon over OSC
whenever they change (ten checks a second), so `musicbridge serve` (default --follow typed)
generates at Ardour's tempo and places stems on Ardour's bars.]]
}

function sess_params ()
	return {
		["url"] = { title = "musicbridge OSC address", default = "osc.udp://127.0.0.1:9010", optional = true },
	}
end

function factory (params)
	local url = (params and params["url"]) or "osc.udp://127.0.0.1:9010"
	local osc = ARDOUR.LuaOSC.Address (url)
	local TICKS_PER_BEAT = 1920 -- Ardour's BBT ticks

	-- Where Ardour is now: rolling, quarter-note bpm, signature, position in beats from bar 1.
	local function read_state ()
		local sample = Session:transport_sample ()
		local tm = Temporal.TempoMap.read ()
		local pos = Temporal.timepos_t (sample)
		local tempo = tm:tempo_at (pos)
		local meter = tm:meter_at (pos)
		local bbt = tm:bbt_at (pos)
		local num, den = meter:divisions_per_bar (), meter:note_value ()
		return {
			rolling = Session:transport_rolling (),
			bpm = tempo:note_types_per_minute () * 4 / tempo:note_type (),
			num = num, den = den,
			beat = (bbt.bars - 1) * num + (bbt.beats - 1) + bbt.ticks / TICKS_PER_BEAT,
			sample = sample,
		}
	end

	-- The messages that tell musicbridge what changed between `last` and `now` (elapsed: samples
	-- between the two readings), as {path, types, args...}.
	local function compose (last, now, elapsed, rate)
		local out = {}
		if not last or math.abs (now.bpm - last.bpm) > 0.005 then
			out[#out + 1] = { "/transport/tempo", "f", now.bpm }
		end
		if not last or now.num ~= last.num or now.den ~= last.den then
			out[#out + 1] = { "/transport/signature", "ii", now.num, now.den }
		end
		if not last or now.rolling ~= last.rolling then
			out[#out + 1] = { now.rolling and "/transport/play" or "/transport/stop", "f", now.beat }
		elseif now.sample ~= last.sample then
			local expected = last.sample + (now.rolling and elapsed or 0)
			if math.abs (now.sample - expected) > rate / 10 then -- a locate (or a loop), not playback
				out[#out + 1] = { now.rolling and "/transport/play" or "/transport/locate", "f", now.beat }
			end
		end
		return out
	end

	local last = nil
	local since = 0
	return function (n_samples)
		since = since + n_samples
		local rate = Session:nominal_sample_rate ()
		if last and since < rate / 10 then return end
		local now = read_state ()
		for _, m in ipairs (compose (last, now, since, rate)) do
			osc:send (table.unpack (m))
		end
		last, since = now, 0
	end
end
