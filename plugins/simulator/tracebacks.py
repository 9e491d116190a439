# ruff: noqa: E501 -- verbatim frames copied from the recordings; splitting them would hide that.
"""Traceback frames the real server reports, reproduced verbatim (paths are the recording's)."""

from __future__ import annotations

# The frames every node failure passes through before reaching the node's own code.
EXECUTION_FRAMES: tuple[str, ...] = (
    '  File "/srv/ComfyUI/execution.py", line 527, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, v3_data=v3_data)\n                                                              ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n',
    '  File "/srv/ComfyUI/execution.py", line 331, in get_output_data\n    return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, v3_data=v3_data)\n                    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n',
    '  File "/srv/ComfyUI/execution.py", line 305, in _async_map_node_over_list\n    await process_inputs(input_dict, i)\n',
    '  File "/srv/ComfyUI/execution.py", line 293, in process_inputs\n    result = f(**inputs)\n             ^^^^^^^^^^^\n',
)

# SaveImage with a filename_prefix that leaves the output folder (runtime_error.json).
SAVE_IMAGE_ESCAPE_FRAMES: tuple[str, ...] = (
    '  File "/srv/ComfyUI/nodes.py", line 1656, in save_images\n    full_output_folder, filename, counter, subfolder, filename_prefix = folder_paths.get_save_image_path(filename_prefix, self.output_dir, images[0].shape[1], images[0].shape[0])\n                                                                        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n',
    '  File "/srv/ComfyUI/folder_paths.py", line 464, in get_save_image_path\n    raise Exception(err)\n',
)


def node_frame(class_type: str, function: str) -> str:
    """A plausible last frame for an injected failure inside `class_type`."""
    return (
        f'  File "/srv/ComfyUI/nodes.py", line 1, in {function}\n'
        f'    raise RuntimeError("simulated failure in {class_type}")\n'
    )
