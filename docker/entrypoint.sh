#!/bin/sh
# Entry point of the pathapp image.
#
# Cytomine's App Engine starts a task's container with no command and no arguments, mounting only
# the task's input and output folders (cytomine/cytomine app-engine, KubernetesScheduler: the
# "task" container gets an image and two volume mounts, no command; docs "Task Docker image": the
# image's default entrypoint and/or command must start the task). So:
#   no arguments   -> the App Engine task: pathapp cytomine task --inputs /inputs --outputs /outputs
#   any arguments  -> the pathapp CLI: docker run IMAGE infer ..., or the legacy Cytomine router's
#                     "cytomine job ..." command line from descriptor.json
# PATHAPP_TASK_INPUTS / PATHAPP_TASK_OUTPUTS move the task's folders (descriptor.yml's
# configuration.input_folder / output_folder are /inputs and /outputs).
set -eu
if [ "$#" -eq 0 ]; then
    exec pathapp cytomine task --inputs "${PATHAPP_TASK_INPUTS:-/inputs}" --outputs "${PATHAPP_TASK_OUTPUTS:-/outputs}"
fi
exec pathapp "$@"
