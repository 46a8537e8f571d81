"""Data parallelism with ``jax.jit`` and ``NamedSharding`` over a 1-D mesh of every device of every process.

The batch is split along the ``'data'`` mesh axis; parameters, optimiser state and BN statistics are
replicated. Under ``jit`` the gradient of the mean loss over a ``P('data')`` batch is already the global mean,
so there is no ``pmap`` and no explicit all-reduce. Multi-host: each process feeds only its own rows with
:func:`global_batch`, built from process-local numpy arrays.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


# Environments in which ``jax.distributed.initialize()`` finds the process group by itself.
CLUSTER_VARS = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS')


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} is not an integer') from None


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Starts JAX's multi-controller runtime when asked to, or when the usual cluster environment is present.

  Explicit arguments (the ``--coordinator_address``, ``--num_processes`` and ``--process_id`` flags) win, then
  the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables; what is still unset
  is auto-detected by ``jax.distributed.initialize()`` under SLURM, Open MPI and TPU pods. Outside those, the
  three must be given together: a partial set raises ``ValueError`` naming what is missing (a process that
  ignored them would run alone, as process 0). Single-process runs without any of these are left alone.
  """
  given = {}                                   # where each setting came from, for the messages
  for flag, env, value in (('coordinator_address', 'JAX_COORDINATOR_ADDRESS', coordinator),
                           ('num_processes', 'JAX_NUM_PROCESSES', num_processes),
                           ('process_id', 'JAX_PROCESS_ID', process_id)):
    if value is not None and value != '':
      given[flag] = (f'--{flag}', value)
    elif os.environ.get(env):
      given[flag] = (env, os.environ[env] if flag == 'coordinator_address' else _env_int(env))
  coordinator, num_processes, process_id = (given.get(k, (None, None))[1]
                                            for k in ('coordinator_address', 'num_processes', 'process_id'))
  name = {k: v[0] for k, v in given.items()}
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'{name["num_processes"]}={num_processes} must be at least 1')
  if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
    upper = f' and below {name["num_processes"]}={num_processes}' if num_processes is not None else ''
    raise ValueError(f'{name["process_id"]}={process_id} must be at least 0{upper} (processes are numbered from 0)')
  if coordinator is not None and (':' not in coordinator or not coordinator.rsplit(':', 1)[1].isdigit()):
    raise ValueError(f'{name["coordinator_address"]}={coordinator!r} must be HOST:PORT, the host of process 0 and '
                     'a free port on it (e.g. 10.0.0.1:1234)')
  auto = any(os.environ.get(v) for v in CLUSTER_VARS)
  if not auto:
    if coordinator is None and num_processes in (None, 1) and process_id in (None, 0):
      return                                           # a single process
    missing = [f'--{k}' for k in ('coordinator_address', 'num_processes', 'process_id') if k not in given]
    if missing:
      have = ' '.join(f'{n}={v}' for n, v in given.values())
      raise ValueError(f'{have} also needs {" and ".join(missing)}: a multi-process run outside SLURM, Open MPI '
                       'or a TPU pod gives all three to every process (--coordinator_address=HOST:PORT of process '
                       '0, --num_processes=N, --process_id=0..N-1); for a single process leave them all out')
  # Cross-process collectives of the CPU backend (tests, CPU clusters); accelerators use their own. Set before
  # initialisation, without querying the backend (that would initialise it too early).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  except (ValueError, TypeError) as e:        # the cluster environment did not give what was missing
    raise ValueError(f'cannot start the multi-process runtime ({e}); pass --coordinator_address=HOST:PORT, '
                     '--num_processes=N and --process_id=i to every process') from e


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D ``('data',)`` mesh over all devices (or the first ``num_devices``), with Auto axis types."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f'asked for {num_devices} devices but only {len(devices)} are visible')
    devices = devices[:num_devices]
  kwargs = {}
  if hasattr(jax.sharding, 'AxisType'):
    kwargs['axis_types'] = (jax.sharding.AxisType.Auto,)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices, **kwargs)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, *, bn_group_size: int = 0) -> None:
  """Validates the global batch against the devices, the processes and the BatchNorm groups."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch % n_dev:
    lower = global_batch // n_dev * n_dev
    nearest = f'{lower} or {lower + n_dev}' if lower else f'{n_dev}'
    raise ValueError(f'global batch {global_batch} is not divisible by {n_dev} devices; use a multiple of {n_dev} '
                     f'(e.g. {nearest})')
  if global_batch % n_proc:
    raise ValueError(f'global batch {global_batch} is not divisible by {n_proc} processes')
  if bn_group_size:
    per_device = global_batch // n_dev
    if global_batch % bn_group_size or (per_device % bn_group_size and bn_group_size % per_device):
      raise ValueError(f'BatchNorm group size {bn_group_size} must divide the global batch {global_batch} and '
                       f'either divide or be a multiple of the per-device batch {per_device}; set '
                       'config.bn_group_size to a divisor of the per-device batch, or 0 for global statistics')


def eval_batch_size(batch_size: int, mesh: Mesh) -> int:
  """The evaluation batch for ``batch_size`` requested on ``mesh``: rounded up to a multiple of the device and
  process counts. Evaluation pads and masks partial batches, so its batch is only how many samples go through
  at once: the scores are the same whatever it is, and any positive size works on any number of devices."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f'evaluation batch size {batch_size!r} must be a positive integer (config.eval_batch_size)')
  step = np.lcm(mesh.devices.size, jax.process_count())
  return int(-(-batch_size // step) * step)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local numpy rows -> global arrays sharded along ``'data'`` (every process passes its own rows)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
