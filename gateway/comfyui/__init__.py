"""ComfyUI's formats and rules, as more than one role needs them.

The API-format workflow and its checks (`workflow`), the order nodes run in (`graph`), prompt
validation with ComfyUI's error bodies (`validation`), node definitions as `/object_info` gives
them (`nodedef`), overrides checked against those (`overrides`), a server's URLs (`urls`),
the names outputs are stored under (`outputs`), what kind of address a host reaches
(`addresses`, for URL inputs and server registration) and the folder of jobs' input files on a
server, which no workflow may name (`jobfiles`).
The adapter, the simulator and the ComfyUI-compatible API all read them from here.
"""
