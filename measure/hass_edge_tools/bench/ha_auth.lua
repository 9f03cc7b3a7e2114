-- wrk script: adds Home Assistant's bearer token (from $HA_TOKEN, so it never appears in a
-- command line) to every request. Used by reads.py (beside it) for HA's own REST API.
local token = os.getenv("HA_TOKEN")
if not token or token == "" then
  error("HA_TOKEN is not set")
end
wrk.headers["Authorization"] = "Bearer " .. token
