"""launch/tpu_vm.sh and launch/gpu_multinode.sh, run for real against stand-ins.

Neither gcloud, a TPU nor SLURM is here, so small stub programs take their place: a `gcloud`
that records its arguments and runs each `tpu-vm ssh --command=SCRIPT` locally (one worker,
with HOME in a temporary directory), a worker `python3`/`uv` pair that builds a fake venv, a
venv python and a PYTHON that record the argv and environment the trainer would get, and an
`srun` that records its flags and runs the task. The scripts themselves are run unchanged, so
what is checked is what a user's machine would run: the packed sources, the install command,
the exact argv of `python -m mpl.main` (quoting included), the background run and its SIGTERM.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, 'launch', 'tpu_vm.sh')
GPU_MULTINODE = os.path.join(ROOT, 'launch', 'gpu_multinode.sh')
SYSTEM_PATH = '/usr/local/bin:/usr/bin:/bin'
BASH = shutil.which('bash')


def _executable(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(text).lstrip())
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


# A program that appends {"argv": [...], "env": {...}} to $RECORD. As a trainer started in the
# background it then waits (up to 30 s) for SIGTERM, and notes it in $RECORD.term.
RECORDER = f"""\
#!{sys.executable}
import json, os, signal, sys, time
record = os.environ['RECORD']
with open(record, 'a') as f:
  f.write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': {{
      k: os.environ.get(k) for k in ('JAX_LOCAL_DEVICE_IDS', 'HOME')}}}}) + '\\n')
if sys.argv[1:2] == ['-c']:
  print('jax 0.0 flax 0.0')
if os.environ.get('WAIT_FOR_TERM'):
  def term(signum, frame):
    open(record + '.term', 'w').write('SIGTERM')
    sys.exit(0)
  signal.signal(signal.SIGTERM, term)
  deadline = time.time() + 30
  while time.time() < deadline:
    time.sleep(0.05)
"""


def _records(path):
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def cloud(tmp_path):
  """A stub gcloud on PATH, and a worker's HOME in which its ssh commands run."""
  bin_dir, home = tmp_path / 'bin', tmp_path / 'worker_home'
  home.mkdir()
  # gcloud: records argv; `scp SRC TPU:DEST` copies SRC into the worker's HOME; `ssh
  # --command=SCRIPT` runs SCRIPT there with bash, with the worker's own python3 first on PATH.
  _executable(bin_dir / 'gcloud', f"""\
    #!{sys.executable}
    import json, os, shutil, subprocess, sys
    args = sys.argv[1:]
    with open(os.environ['GCLOUD_LOG'], 'a') as f:
      f.write(json.dumps(args) + '\\n')
    home = os.environ['WORKER_HOME']
    if args[:4] == ['compute', 'tpus', 'tpu-vm', 'scp']:
      shutil.copy(args[4], os.path.join(home, args[5].split(':', 1)[1]))
    if args[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh']:
      script = [a for a in args if a.startswith('--command=')][0][len('--command='):]
      env = dict(os.environ, HOME=home,
                 PATH=os.environ['WORKER_BIN'] + ':' + os.environ['PATH'])
      sys.exit(subprocess.run(['bash', '-c', script], cwd=home, env=env).returncode)
    """)
  # The worker: `python3 -m pip install --user uv` puts a uv in ~/.local/bin; `uv venv DIR`
  # makes DIR/bin/python (the recorder); `uv pip install ...` only records its argv.
  worker_bin = tmp_path / 'worker_bin'
  _executable(worker_bin / 'python3', f"""\
    #!/usr/bin/env bash
    set -e
    [[ "$1 $2 $3" == "-m pip install" ]] || {{ echo "unexpected python3 $*" >&2; exit 1; }}
    mkdir -p "$HOME/.local/bin"
    cat > "$HOME/.local/bin/uv" <<'EOF'
    #!/usr/bin/env bash
    set -e
    echo "$*" >> "$HOME/uv_calls"
    if [[ $1 == venv ]]; then
      mkdir -p "${{@: -1}}/bin" && cp "$RECORDER_PATH" "${{@: -1}}/bin/python"
    fi
    EOF
    chmod +x "$HOME/.local/bin/uv"
    """)
  recorder = _executable(tmp_path / 'recorder', RECORDER)
  env = {**os.environ, 'PATH': f'{bin_dir}:{SYSTEM_PATH}', 'WORKER_HOME': str(home),
         'WORKER_BIN': str(worker_bin), 'GCLOUD_LOG': str(tmp_path / 'gcloud_log'),
         'RECORDER_PATH': str(recorder), 'RECORD': str(tmp_path / 'trainer_record'),
         'TMPDIR': str(tmp_path)}
  for name in ('TPU_NAME', 'ZONE', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION', 'PROJECT', 'SPOT',
               'REPO_URL', 'REPO_REF', 'CONFIG', 'WORKDIR', 'PYTHON_VERSION', 'BACKGROUND',
               'DRY_RUN'):
    env.pop(name, None)

  class Cloud:
    path = tmp_path
    worker_home = home
    record = tmp_path / 'trainer_record'

    def __init__(self):
      self.env = env

    def tpu_vm(self, *args, script=TPU_VM, **extra_env):
      return subprocess.run([BASH, script, *args], env={**self.env, **extra_env},
                            capture_output=True, text=True, timeout=120)

    def gcloud_calls(self):
      log = tmp_path / 'gcloud_log'
      return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []

  return Cloud()


@pytest.mark.parametrize('accelerator, runtime', [
    ('v4-32', 'tpu-ubuntu2204-base'), ('v3-2048', 'tpu-ubuntu2204-base'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-8', 'v2-alpha-tpuv5'),
    ('v6e-8', 'v2-alpha-tpuv6e'),
])
def test_tpu_create_picks_the_runtime_of_the_accelerator(accelerator, runtime, cloud):
  result = cloud.tpu_vm('--type', accelerator, '--name', 'my-tpu', '--zone', 'europe-west4-a',
                        '--project', 'proj', 'create')
  assert result.returncode == 0, result.stderr
  assert cloud.gcloud_calls() == [[
      'compute', 'tpus', 'tpu-vm', 'create', 'my-tpu', '--zone=europe-west4-a',
      '--project=proj', f'--accelerator-type={accelerator}', f'--version={runtime}']]


def test_tpu_create_spot_and_an_explicit_runtime_from_the_environment(cloud):
  result = cloud.tpu_vm('create', SPOT='1', RUNTIME_VERSION='v2-alpha-tpuv6e', TPU_NAME='t')
  assert result.returncode == 0, result.stderr
  call, = cloud.gcloud_calls()
  assert call[:5] == ['compute', 'tpus', 'tpu-vm', 'create', 't']
  assert '--version=v2-alpha-tpuv6e' in call and '--spot' in call
  assert '--zone=us-central2-b' in call and not any(a.startswith('--project') for a in call)


def test_tpu_dry_run_prints_and_runs_nothing(cloud):
  result = cloud.tpu_vm('--dry-run', '--spot', 'create')
  assert result.returncode == 0, result.stderr
  assert ('+ gcloud compute tpus tpu-vm create mpl-tpu --zone=us-central2-b '
          '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot') in result.stderr
  assert cloud.gcloud_calls() == []


def _git_repo(path):
  """A checkout of its own (the script packs the repository it sits in): tracked, untracked,
  ignored and deleted-but-tracked files."""
  shutil.copytree(os.path.join(ROOT, 'launch'), path / 'launch')
  (path / 'mpl').mkdir()
  (path / 'mpl' / 'main.py').write_text('# trainer\n')
  shutil.copy(os.path.join(ROOT, 'requirements.txt'), path / 'requirements.txt')
  (path / '.gitignore').write_text('/runs/\n__pycache__/\n')
  (path / 'gone.py').write_text('')
  git = ['git', '-C', str(path), '-c', 'user.email=t@t', '-c', 'user.name=t']
  subprocess.run(git + ['init', '-q'], check=True)
  subprocess.run(git + ['add', '-A'], check=True)
  subprocess.run(git + ['commit', '-qm', 'x'], check=True)
  (path / 'gone.py').unlink()                      # deleted, not yet committed
  (path / 'new_config.py').write_text('')          # untracked: a user's new file goes too
  (path / 'runs' / 'old').mkdir(parents=True)      # ignored: not shipped
  (path / 'runs' / 'old' / 'ckpt').write_text('')
  (path / 'mpl' / '__pycache__').mkdir()
  (path / 'mpl' / '__pycache__' / 'main.pyc').write_text('')
  return path


def _jax_version():
  lines = open(os.path.join(ROOT, 'requirements.txt')).read().splitlines()
  return [l.split('==')[1] for l in lines if l.startswith('jax==')][0]


def test_tpu_setup_ships_the_checkout_and_installs_the_pinned_jax_for_tpu(cloud, tmp_path):
  repo = _git_repo(tmp_path / 'checkout')
  old = cloud.worker_home / 'mpl'
  old.mkdir()
  (old / 'stale.py').write_text('')                # setup replaces an earlier copy
  result = cloud.tpu_vm('--python', '3.11', 'setup', script=str(repo / 'launch' / 'tpu_vm.sh'))
  assert result.returncode == 0, result.stderr
  scp, ssh = cloud.gcloud_calls()
  assert scp[:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  assert ssh[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'mpl-tpu'] and '--worker=all' in ssh
  assert not os.path.exists(scp[4])                # the local tarball is cleaned up
  shipped = sorted(os.path.relpath(os.path.join(d, f), old)
                   for d, _, files in os.walk(old) for f in files)
  assert 'mpl/main.py' in shipped and 'requirements.txt' in shipped
  assert 'launch/tpu_vm.sh' in shipped and 'new_config.py' in shipped
  assert not [f for f in shipped if f.startswith('runs/') or 'pycache' in f or f == 'gone.py']
  assert 'stale.py' not in shipped
  assert not (cloud.worker_home / 'mpl_src.tar.gz').exists()
  uv = (cloud.worker_home / 'uv_calls').read_text().splitlines()
  assert uv == ['venv -q --python 3.11 mpl_venv',
                'pip install -q --python mpl_venv/bin/python -r mpl/requirements.txt '
                f'jax[tpu]=={_jax_version()}']
  assert 'jax 0.0 flax 0.0' in result.stdout      # the closing import check ran


def test_tpu_setup_from_a_git_url_clones_the_ref(cloud):
  result = cloud.tpu_vm('--dry-run', '--repo-url', 'https://example.com/me/mpl.git',
                        '--repo-ref', 'v1.0', 'setup')
  assert result.returncode == 0, result.stderr
  assert 'git clone --depth 1 --branch v1.0 https://example.com/me/mpl.git mpl' in result.stderr
  assert 'scp' not in result.stderr


def _install_fake_venv(cloud):
  """What `setup` leaves on a worker: the checkout and a venv whose python is the recorder."""
  os.symlink(ROOT, cloud.worker_home / 'mpl')
  venv_bin = cloud.worker_home / 'mpl_venv' / 'bin'
  venv_bin.mkdir(parents=True)
  shutil.copy(cloud.path / 'recorder', venv_bin / 'python')


def test_tpu_run_gives_the_trainer_the_exact_arguments(cloud):
  _install_fake_venv(cloud)
  config = "configs/efficientnet_l2_mpl.py:unlabeled=my set"
  result = cloud.tpu_vm('--config', config, '--workdir', 'gs://bucket/run 1', 'run', '--',
                        '--config.mesh.model=16', "--config.data.data_dir=/it's here")
  assert result.returncode == 0, result.stderr
  call, = _records(cloud.record)
  assert call['argv'] == ['-m', 'mpl.main', '--config', config, '--workdir', 'gs://bucket/run 1',
                          '--distributed', '--config.mesh.model=16',
                          "--config.data.data_dir=/it's here"]
  assert os.path.realpath(call['cwd']) == os.path.realpath(ROOT)   # ~/mpl: imports mpl
  assert 'relative' not in result.stderr


def test_tpu_run_warns_of_a_relative_workdir_and_needs_config_and_workdir(cloud):
  _install_fake_venv(cloud)
  result = cloud.tpu_vm('run', CONFIG='configs/imagenet10_mpl.py', WORKDIR='runs/x')
  assert result.returncode == 0, result.stderr
  assert 'WORKDIR=runs/x is relative' in result.stderr
  assert _records(cloud.record)[0]['argv'][:6] == [
      '-m', 'mpl.main', '--config', 'configs/imagenet10_mpl.py', '--workdir', 'runs/x']
  for args, missing in [(('run',), 'CONFIG is not set: pass --config'),
                        (('--config', 'c.py', 'run'), 'WORKDIR is not set: pass --workdir'),
                        (('--workdir', 'gs://b', 'all'), 'CONFIG is not set')]:
    result = cloud.tpu_vm(*args)
    assert result.returncode == 1 and f'error: {missing}' in result.stderr, result.stderr
  assert len(_records(cloud.record)) == 1
  assert not [c for c in cloud.gcloud_calls() if 'create' in c]   # `all` stopped before create


def test_tpu_background_run_then_stop_sends_the_trainer_sigterm(cloud):
  _install_fake_venv(cloud)
  common = ('--config', 'configs/imagenet10_mpl.py', '--workdir', 'gs://b/r')
  result = cloud.tpu_vm(*common, '--background', 'run', WAIT_FOR_TERM='1')
  assert result.returncode == 0, result.stderr
  assert 'started pid' in result.stdout and 'logs' in result.stderr
  pid = int((cloud.worker_home / 'mpl_run.pid').read_text())
  deadline = time.time() + 20
  while not _records(cloud.record) and time.time() < deadline:
    time.sleep(0.05)
  assert _records(cloud.record)[0]['argv'][-1] == '--distributed'
  result = cloud.tpu_vm('stop')
  assert result.returncode == 0, result.stderr
  assert 'SIGTERM sent' in result.stdout
  term = cloud.path / 'trainer_record.term'
  while not term.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert term.read_text() == 'SIGTERM'             # the trainer itself got it, not a wrapper
  while time.time() < deadline:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      break
    time.sleep(0.05)
  result = cloud.tpu_vm('stop')                    # nothing left to stop
  assert result.returncode == 0 and 'no running mpl job' in result.stdout


def test_tpu_logs_status_and_delete_name_the_tpu(cloud):
  flags = ('--name', 'big', '--zone', 'us-east5-a', '--dry-run')
  assert 'tail -n 100 -F ~/mpl_run.log' in cloud.tpu_vm(*flags, 'logs').stderr
  assert '--worker=0' in cloud.tpu_vm(*flags, 'logs').stderr
  assert ('+ gcloud compute tpus tpu-vm describe big --zone=us-east5-a'
          in cloud.tpu_vm(*flags, 'status').stderr)
  assert ('+ gcloud compute tpus tpu-vm delete big --zone=us-east5-a'
          in cloud.tpu_vm(*flags, 'delete').stderr)


@pytest.mark.parametrize('args, message', [
    ((), 'no command given (create, setup, run, all, status, logs, stop, delete)'),
    (('craete',), "unknown command 'craete'"),
    (('create', 'run'), "one command at a time (got 'create' and 'run')"),
    (('--typo', 'create'), 'unknown option --typo (see --help)'),
])
def test_tpu_vm_says_what_is_wrong_with_its_arguments(args, message, cloud):
  result = cloud.tpu_vm('--dry-run', *args)
  assert result.returncode != 0 and f'error: {message}' in result.stderr, result.stderr
  assert cloud.gcloud_calls() == []


def test_tpu_vm_without_gcloud_says_how_to_install_it(cloud, tmp_path):
  bare = tmp_path / 'bare_bin'   # the tools the script needs, and no gcloud
  bare.mkdir()
  for tool in ('dirname', 'sed'):
    os.symlink(shutil.which(tool), bare / tool)
  result = cloud.tpu_vm('create', PATH=str(bare))
  assert result.returncode == 1
  assert 'error: gcloud not found. Install the Google Cloud CLI' in result.stderr


def test_launch_scripts_help_is_their_header():
  for script, first in [(TPU_VM, 'Runs mpl on a Cloud TPU VM'),
                        (GPU_MULTINODE, 'Runs mpl on several GPU nodes')]:
    result = subprocess.run(['bash', script, '--help'], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith(first), result.stdout
    assert '#' not in result.stdout.splitlines()[0] and 'set -euo' not in result.stdout


# ---- launch/gpu_multinode.sh ----

def _gpu_multinode(tmp_path, *args, **env):
  recorder = tmp_path / 'recorder'
  if not recorder.exists():
    _executable(recorder, RECORDER)
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(('SLURM_', 'NUM_NODES', 'NODE_RANK', 'COORDINATOR', 'REPO_DIR',
                               'JAX_LOCAL_DEVICE_IDS', 'CUDA_VISIBLE_DEVICES'))}
  env = {**base, 'PATH': f'{tmp_path / "bin"}:{SYSTEM_PATH}', 'PYTHON': str(recorder),
         'RECORD': str(tmp_path / 'record'), **env}
  return subprocess.run(['bash', GPU_MULTINODE, *args], env=env, capture_output=True,
                        text=True, timeout=60)


def test_gpu_multinode_explicit_coordinator_gives_each_node_its_rank(tmp_path):
  result = _gpu_multinode(tmp_path, 'configs/imagenet10_mpl.py', '/shared/runs/x y',
                          '--config.mesh.model=8', NUM_NODES='2', NODE_RANK='1',
                          COORDINATOR='10.0.0.1:12345', CUDA_VISIBLE_DEVICES='4,5,6')
  assert result.returncode == 0, result.stderr
  call, = _records(tmp_path / 'record')
  assert call['argv'] == [
      '-m', 'mpl.main', '--config', 'configs/imagenet10_mpl.py', '--workdir', '/shared/runs/x y',
      '--distributed', '--coordinator_address=10.0.0.1:12345', '--num_processes=2',
      '--process_id=1', '--config.mesh.model=8']
  assert os.path.realpath(call['cwd']) == os.path.realpath(ROOT)
  # Three visible GPUs: this one process drives all three (JAX numbers the visible ones 0..2).
  assert call['env']['JAX_LOCAL_DEVICE_IDS'] == '0,1,2'


def test_gpu_multinode_flags_are_the_trainers_own():
  from mpl import main  # pylint: disable=g-import-not-at-top
  for flag in ('config', 'workdir', 'distributed', 'coordinator_address', 'num_processes',
               'process_id'):
    assert flag in main.FLAGS, flag


def test_gpu_multinode_under_slurm_runs_one_task_per_node_with_every_gpu(tmp_path):
  _executable(tmp_path / 'bin' / 'srun', f"""\
    #!/usr/bin/env bash
    echo "$*" > {tmp_path / 'srun_args'}
    while [[ $1 == --* ]]; do shift; done
    exec "$@"
    """)
  submit_dir = tmp_path / 'elsewhere'
  submit_dir.mkdir()
  result = _gpu_multinode(tmp_path, 'configs/imagenet10_mpl.py', '/shared/r',
                          SLURM_JOB_ID='77', SLURM_JOB_NUM_NODES='4', SLURM_GPUS_ON_NODE='8',
                          SLURM_SUBMIT_DIR=ROOT)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'srun_args').read_text().startswith('--nodes=4 --ntasks-per-node=1 ')
  call, = _records(tmp_path / 'record')
  assert call['argv'] == ['-m', 'mpl.main', '--config', 'configs/imagenet10_mpl.py',
                          '--workdir', '/shared/r', '--distributed']   # SLURM finds the rest
  assert call['env']['JAX_LOCAL_DEVICE_IDS'] == '0,1,2,3,4,5,6,7'
  # Submitted from another directory: not the repository, and it says so.
  result = _gpu_multinode(tmp_path, 'c.py', '/w', SLURM_JOB_ID='77',
                          SLURM_SUBMIT_DIR=str(submit_dir))
  assert result.returncode == 1
  assert f'error: {submit_dir} is not the mpl repository' in result.stderr


def test_gpu_multinode_keeps_a_users_device_list(tmp_path):
  result = _gpu_multinode(tmp_path, 'c.py', '/w', NUM_NODES='1', NODE_RANK='0',
                          COORDINATOR='h:1', CUDA_VISIBLE_DEVICES='0,1',
                          JAX_LOCAL_DEVICE_IDS='1')
  assert result.returncode == 0, result.stderr
  assert _records(tmp_path / 'record')[0]['env']['JAX_LOCAL_DEVICE_IDS'] == '1'


@pytest.mark.parametrize('args, env, message', [
    ((), {}, 'CONFIG and WORKDIR are required'),
    (('c.py', '/w'), {}, 'neither SLURM (submit with sbatch) nor COORDINATOR=host:port'),
    (('c.py', '/w'), {'COORDINATOR': 'h:1', 'NODE_RANK': '0'}, 'set NUM_NODES'),
    (('c.py', '/w'), {'COORDINATOR': 'h:1', 'NUM_NODES': '2'}, 'set NODE_RANK'),
    (('c.py', '/w'), {'COORDINATOR': 'h:1', 'NUM_NODES': '0', 'NODE_RANK': '0'},
     'NUM_NODES=0 is not a positive integer'),
    (('c.py', '/w'), {'COORDINATOR': 'h:1', 'NUM_NODES': '2', 'NODE_RANK': '2'},
     'NODE_RANK=2 must be an integer in 0 .. 1'),
    (('c.py', '/w'), {'COORDINATOR': 'h:1', 'NUM_NODES': '2', 'NODE_RANK': 'x'},
     'NODE_RANK=x must be an integer'),
    (('c.py', '/w'), {'COORDINATOR': '10.0.0.1', 'NUM_NODES': '2', 'NODE_RANK': '0'},
     'COORDINATOR=10.0.0.1 must be host:port'),
    (('c.py', '/w'), {'COORDINATOR': 'h:1', 'NUM_NODES': '1', 'NODE_RANK': '0',
                      'PYTHON': 'no-such-python'}, 'PYTHON=no-such-python not found'),
])
def test_gpu_multinode_says_what_is_wrong_before_starting(args, env, message, tmp_path):
  result = _gpu_multinode(tmp_path, *args, **env)
  assert result.returncode != 0 and message in result.stderr, result.stderr
  assert not (tmp_path / 'record').exists()
