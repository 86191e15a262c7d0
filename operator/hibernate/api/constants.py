"""Every name that crosses a process boundary: API group, labels, annotations, reasons.

One file, so that the operator, the agent, the gateway and the tests agree by construction.
"""

from typing import Final

GROUP: Final = "hibernate.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "ModelDeployment"
PLURAL: Final = "modeldeployments"
SINGULAR: Final = "modeldeployment"
SHORT_NAMES: Final = ("md",)
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

# Labels the operator puts on every pod it owns.
LABEL_MODEL: Final = f"{GROUP}/model"
LABEL_MANAGED: Final = f"{GROUP}/managed"

# Pod annotations: the agent's interface (design.md, "Pod annotations").
ANN_SLEEP_LEVEL: Final = f"{GROUP}/sleep-level"
ANN_STATE: Final = f"{GROUP}/state"
ANN_OBSERVED_LEVEL: Final = f"{GROUP}/observed-sleep-level"
ANN_LAST_OPERATION: Final = f"{GROUP}/last-operation"
# Operator bookkeeping on pods: the model's level (spec.sleepLevel, or the automatic level while one
# is set) the operator last wrote onto this pod. While the model keeps that level, the pod's own
# sleep-level is left alone, so a person's override of one pod holds until the level changes again.
ANN_SPEC_LEVEL: Final = f"{GROUP}/spec-sleep-level"

# Written by the operator on each pod (spec.drainSeconds): how long a sleep waits for the requests
# in flight to finish before it aborts them. The agent reads it; absent, DEFAULT_DRAIN_SECONDS.
ANN_DRAIN_SECONDS: Final = f"{GROUP}/drain-seconds"
DEFAULT_DRAIN_SECONDS: Final = 30

# The pod condition behind the engine pods' readiness gate: the agent sets it True only while the pod
# is Awake and False before a sleep starts, so a sleeping replica leaves its Service's ready endpoints.
CONDITION_AWAKE: Final = f"{GROUP}/awake"

# A person's request on one pod: `hibernate.dev/discard-checkpoint: "true"` makes the agent discard the
# pod's checkpoint image (a restore refused on another GPU or driver cannot use it) and restart its
# engine container cold, in the same pod; the agent removes the annotation once it has acted on it.
ANN_DISCARD_CHECKPOINT: Final = f"{GROUP}/discard-checkpoint"
# Written by the operator into the pod template when `spec.verifyWake` is false: the agent then does
# not compare the engine's answer after a wake from CudaSuspend or Checkpoint with the one before.
ANN_VERIFY_WAKE: Final = f"{GROUP}/verify-wake"
# The agent's record of that answer (JSON: model, prompt, max_tokens, text, taken), written before a
# sleep at CudaSuspend or Checkpoint and removed once the woken engine has given the same answer.
ANN_WAKE_CHECK: Final = f"{GROUP}/wake-check"

# Written by the operator into the pod template: where this model's level-4 images go on the node
# (spec.checkpoint.directory). The agent only accepts directories under its own allowed roots.
ANN_CHECKPOINT_DIR: Final = f"{GROUP}/checkpoint-dir"

# Stop with a snapshot (docs/snapshots.md). Before a Stop scales the Deployment to zero, the operator asks
# the agent of one replica for a snapshot on that pod (JSON: id, specHash, requested) and waits, bounded
# (spec.stop.timeoutSeconds), for the agent's answer on the same pod (JSON: id, then node, specHash,
# bytes, taken, seconds; or error). The new pods of a wake from Stop carry ANN_RESTORE_FROM in their
# template (JSON: node, specHash, taken) and the init's restore wait (ENV_RESTORE_WAIT); the agent
# restores them and reports on ANN_RESTORE (JSON: restored, seconds, reason).
ANN_SNAPSHOT_REQUEST: Final = f"{GROUP}/snapshot-request"
ANN_SNAPSHOT: Final = f"{GROUP}/snapshot"
ANN_RESTORE_FROM: Final = f"{GROUP}/restore-from"
ANN_RESTORE: Final = f"{GROUP}/restore"
ENV_RESTORE_WAIT: Final = "HIBERNATE_RESTORE_WAIT"  # read by hibernate.podinit
CONDITION_SNAPSHOT_READY: Final = "SnapshotReady"
HOSTNAME_LABEL: Final = "kubernetes.io/hostname"

# Operator bookkeeping on the Deployment: the replica count before Stop scaled it to zero.
ANN_REPLICAS_BEFORE_STOP: Final = f"{GROUP}/replicas-before-stop"

# Activity mark written by the gateway on the ModelDeployment (RFC 3339 timestamp).
ANN_LAST_ACTIVITY: Final = f"{GROUP}/last-activity"
# A ModelDeployment annotated `hibernate.dev/wake-on-request: "false"` is never woken by a request:
# the gateway answers 503 while it sleeps (a person's level wins).
ANN_WAKE_ON_REQUEST: Final = f"{GROUP}/wake-on-request"

# The automatic level of a ModelDeployment (docs/gateway.md, "Automatic levels"): what the idle
# ladder or a wake on request decided, kept out of `spec` (the person's, and GitOps tools') as
# annotations that GitOps tools leave alone. It applies only while ANN_AUTO_GENERATION equals the
# object's metadata.generation, so a person's change of the spec resets it. Written only through
# hibernate.controller.auto_level; read through hibernate.api.auto_level.
ANN_AUTO_LEVEL: Final = f"{GROUP}/auto-sleep-level"
ANN_AUTO_SOURCE: Final = f"{GROUP}/auto-sleep-level-source"  # who decided: idle, gateway, …
ANN_AUTO_REASON: Final = f"{GROUP}/auto-sleep-level-reason"  # why, in words
ANN_AUTO_GENERATION: Final = f"{GROUP}/auto-sleep-level-generation"  # the spec it was decided on
ANN_AUTO_TIME: Final = f"{GROUP}/auto-sleep-level-time"  # when (RFC 3339 UTC)
AUTO_ANNOTATIONS: Final = (
    ANN_AUTO_LEVEL,
    ANN_AUTO_SOURCE,
    ANN_AUTO_REASON,
    ANN_AUTO_GENERATION,
    ANN_AUTO_TIME,
)

# Escalation to Stop (design.md: a failed sleep that cannot be undone escalates "up to Stop"). The node
# agent cannot scale, so it asks on the pod (`hibernate.dev/escalate-to: Stop`) and leaves the pod alone;
# the operator stops the pod's ModelDeployment as an automatic level (source ESCALATION_SOURCE), never
# through `spec`: a person's next change of the spec ends it.
ANN_ESCALATE_TO: Final = f"{GROUP}/escalate-to"
ESCALATE_TO_STOP: Final = "Stop"
ESCALATION_SOURCE: Final = "escalation"

# kopf keeps its own progress here, never in the user's status.
KOPF_PREFIX: Final = f"kopf.{GROUP}"
FINALIZER: Final = f"{GROUP}/cleanup"

# Pod states written by the agent into ANN_STATE.
STATE_AWAKE: Final = "Awake"
STATE_SLEEPING: Final = "Sleeping"
STATE_ASLEEP: Final = "Asleep"
STATE_WAKING: Final = "Waking"
STATE_FAILED: Final = "Failed"
POD_STATES: Final = (STATE_AWAKE, STATE_SLEEPING, STATE_ASLEEP, STATE_WAKING, STATE_FAILED)

# Level 5 on one pod cannot be done (the agent handles 1-4; Stop scales the whole Deployment): the
# agent's Warning on the pod and the pod's report both say so, and the ModelDeployment folds it as Failed.
REASON_STOP_ON_POD: Final = "StopOnPod"
STOP_ON_POD: Final = (
    "Stop applies to a whole ModelDeployment: a pod cannot be stopped on its own (set the "
    "ModelDeployment's spec.sleepLevel to Stop, or give this pod a level 0-4); the pod stays where it is"
)

DEFAULT_CHECKPOINT_DIR: Final = "/var/lib/hibernate/checkpoints"
ENGINE_CONTAINER: Final = "engine"

# The agent's hint on `POST /sleep` (a query parameter vLLM ignores): what comes after the engine's
# sleep, so an engine that knows it can prepare for it (docs/levels.md, "Hints"). An engine that
# answers a hinted sleep with a 4xx is asked again without the hint.
SLEEP_HINT_PARAM: Final = "hibernate"
PREPARE_CUDA_SUSPEND: Final = "cuda-suspend"  # level 1, then the driver checkpoints the context
PREPARE_CHECKPOINT: Final = "checkpoint"  # level 2, then CUDA suspend and a CRIU dump of the process
SLEEP_HINTS: Final = (PREPARE_CUDA_SUSPEND, PREPARE_CHECKPOINT)

# GpuGroup (issue 20): ModelDeployments that take turns on one GPU (docs/gpu-sharing.md).
GPU_GROUP_KIND: Final = "GpuGroup"
GPU_GROUP_PLURAL: Final = "gpugroups"
GPU_GROUP_SINGULAR: Final = "gpugroup"
GPU_GROUP_SHORT_NAMES: Final = ("gg",)
GPU_GROUP_CRD_NAME: Final = f"{GPU_GROUP_PLURAL}.{GROUP}"
# On a GpuGroup: who holds its GPU, as JSON (hibernate.api.gpu_group.Lease). Written by the gateway
# with resourceVersion compare-and-swap, so two gateway replicas never wake more than the budget.
ANN_GPU_LEASE: Final = f"{GROUP}/gpu-lease"
# On a group member's pods: the group, so that the members' pod affinity finds each other.
LABEL_GPU_GROUP: Final = f"{GROUP}/gpu-group"
# The source of the automatic levels the gateway sets to make room in a group.
GPU_GROUP_SOURCE: Final = "gpu-group"
