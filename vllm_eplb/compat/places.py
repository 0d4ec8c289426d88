"""Every place in vLLM's source that vllm-eplb names as a string, declared once. No vLLM
import, no import of the rest of the wing (versions.py reads this table).

A place is a module and a qualname in it ("" for the module itself). The hooks
(integration/hooks.py) replace places and change others, the static seam check
(tools/seams.py) reads each one in every declared release's sdist, and versions.py names
the files of a release's known gaps: all of them from here, so a release that moves a
definition is one edit of this table. A place a release names otherwise says so in
`renamed` (release -> its qualname there); the releases that do not have a place at all
are the guards' business (guards.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Place:
    module: str  # dotted, "vllm.engine.arg_utils"
    qualname: str = ""  # "EngineArgs.create_engine_config"; "": the module itself
    renamed: dict[str, str] = field(default_factory=dict)  # release -> the qualname in that release

    @property
    def file(self) -> str:
        """The module's file in a source tree ("vllm/engine/arg_utils.py")."""
        return self.module.replace(".", "/") + ".py"

    def __str__(self) -> str:
        """"module:qualname", as log lines and problems name it."""
        return f"{self.module}:{self.qualname}"

    def qualname_in(self, version: str) -> str:
        return self.renamed.get(version, self.qualname)

    def member(self, name: str) -> Place:
        return Place(self.module, f"{self.qualname}.{name}" if self.qualname else name)


# --------------------------------------------------------------------------- modules

ARG_UTILS = "vllm.engine.arg_utils"
PARALLEL = "vllm.config.parallel"
V1_RUNNER = "vllm.v1.worker.gpu_model_runner"  # the V1 GPU runner; the CPU runner subclasses it
V2_RUNNER = "vllm.v1.worker.gpu.model_runner"
V2_EPLB = "vllm.v1.worker.gpu.eplb_utils"  # the V2 runner's EPLBController
CPU_RUNNER = "vllm.v1.worker.cpu_model_runner"
WORKER_MODULE = "vllm.v1.worker.gpu_worker"  # the CPU worker subclasses its Worker
BASE_LOADER = "vllm.model_executor.model_loader.base_loader"
LOADER_UTILS = "vllm.model_executor.model_loader.utils"
FUSED_MOE = "vllm.model_executor.layers.fused_moe"
BASE_ROUTER = f"{FUSED_MOE}.router.base_router"
INTERFACES = "vllm.model_executor.models.interfaces"

# --------------------------------------------------------------------------- the CLI and config

CLI_MAIN = Place("vllm.entrypoints.cli.main", "main")
GET_KWARGS = Place(ARG_UTILS, "get_kwargs")  # builds --eplb-config's argparse kwargs
ADD_CLI_ARGS = Place(ARG_UTILS, "EngineArgs.add_cli_args")
CREATE_ENGINE_CONFIG = Place(ARG_UTILS, "EngineArgs.create_engine_config")
PARALLEL_PLATFORM = Place(PARALLEL, "current_platform")  # what the EPLB platform gate asks
VALIDATE_PARALLEL = Place(PARALLEL, "ParallelConfig._validate_parallel_config")  # the gate
EPLB_CONFIG = Place(PARALLEL, "EPLBConfig")
EPLB_COMMUNICATORS = Place(PARALLEL, "EPLBCommunicatorBackend")

# --------------------------------------------------------------------------- runners and workers

UPSTREAM_EPLB_STATE = Place("vllm.distributed.eplb.eplb_state", "EplbState")
V1_EPLB_STATE = Place(V1_RUNNER, "EplbState")  # the module global the V1 runner builds its state from
V2_EPLB_STATE = Place(V2_EPLB, "EplbState")
V1_DUMMY_RUN = Place(V1_RUNNER, "GPUModelRunner._dummy_run")
V2_DUMMY_RUN = Place(V2_RUNNER, "GPUModelRunner._dummy_run")
CPU_LOAD_MODEL = Place(CPU_RUNNER, "CPUModelRunner.load_model")
WORKER = Place(WORKER_MODULE, "Worker")
CPU_COMMUNICATOR = Place("vllm.distributed.device_communicators.cpu_communicator", "CpuCommunicator")

# Every file that uses a runner's EPLB state (tools/seams.check_state_api reads each).
STATE_USERS = (
    Place(V1_RUNNER), Place(V2_EPLB), Place(V2_RUNNER), Place(CPU_RUNNER),
    Place("vllm.v1.spec_decode.llm_base_proposer"), Place("vllm.v1.spec_decode.extract_hidden_states"),
    Place("vllm.v1.worker.gpu.spec_decode.speculator"),
)

# --------------------------------------------------------------------------- the model loader and MoE layers

LOADER_INITIALIZE_MODEL = Place(BASE_LOADER, "initialize_model")  # the module global the loader builds with
BASE_MODEL_LOADER = Place(BASE_LOADER, "BaseModelLoader")
CREATE_MODEL = Place(
    BASE_LOADER, "BaseModelLoader.create_model",
    renamed={"0.26.0": "BaseModelLoader.load_model"},  # 0.26.0 builds the model in load_model
)
INITIALIZE_MODEL = Place(LOADER_UTILS, "initialize_model")
MOE_INTERFACE = Place(INTERFACES, "MixtureOfExperts")
FUSED_MOE_FACTORY = Place(
    f"{FUSED_MOE}.layer", "FusedMoEFactory",
    renamed={"0.26.0": "FusedMoE"},  # the same factory, under its older name
)
MOE_RUNNER = Place(f"{FUSED_MOE}.runner.moe_runner", "MoERunner")
EXPERT_WEIGHT_LOADER = Place(f"{FUSED_MOE}.routed_experts", "RoutedExperts.weight_loader")

# --------------------------------------------------------------------------- the router and the CPU kernels

MAP_AND_RECORD = Place(BASE_ROUTER, "eplb_map_to_physical_and_record")  # a module global, called by its bare name
BASE_ROUTER_CLASS = Place(BASE_ROUTER, "BaseRouter")
CPU_EXPERTS_APPLY = Place(f"{FUSED_MOE}.experts.cpu_moe", "CPUUnquantizedExperts.apply")
MOE_SETUP_KERNEL = Place(f"{FUSED_MOE}.unquantized_fused_moe_method", "UnquantizedFusedMoEMethod._setup_kernel")
