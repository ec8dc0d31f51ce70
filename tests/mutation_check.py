"""Plant known faults, one at a time, in a temporary copy of the project and report which the tests catch.

Run by hand (not in CI; each fault reruns the tests aimed at its area, a few minutes in all per fault):

    python tests/mutation_check.py                 # every fault
    python tests/mutation_check.py critic-frozen   # the named ones
    python tests/mutation_check.py --list          # names, files and tests
    python tests/mutation_check.py --full          # run the whole suite per fault instead of the aimed tests

A fault is a plain text replacement that must match exactly once, so a refactor that moves the line makes the
fault fail loudly ("not found") instead of silently planting nothing. Keep the list growing: every fault a
review or a bug report finds that the suite missed belongs here with the test that now catches it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPDATE_MATH = "tests/test_update_math.py"
EXACT = "tests/test_engine_exactness.py"
WIRING = "tests/test_algorithm_wiring.py"
TRL = "tests/test_trl_adapter.py"


@dataclass(frozen=True)
class Fault:
    name: str
    path: str              # file, relative to the repository root
    old: str               # text that occurs exactly once in it
    new: str               # what replaces it
    tests: tuple[str, ...]  # the tests aimed at it (pytest node ids or files)
    why: str = ""
    # The tiny preset's steps 1-2 are trained once, unplanted, and shared (RLHF_TESTS_TINY_RUN); a fault in
    # what steps 1-2 run must have them retrained with the fault in place.
    retrain: bool = False


FAULTS = [
    # -- the engine (issue 13's planted faults and their kin)
    Fault("sampling-ignores-filters", "hybrid_engine/generation.py",
          "probs = filter_logits(scores, params.top_k, params.top_p).softmax(dim=-1)",
          "probs = logits.softmax(dim=-1)",
          ("tests/test_engine.py",), "samples from softmax(logits): temperature, top-k and top-p ignored"),
    Fault("sampling-ignores-temperature", "hybrid_engine/generation.py",
          "scores = logits / params.temperature if params.temperature != 1.0 else logits",
          "scores = logits",
          ("tests/test_engine.py",), "samples of softmax(logits), not softmax(logits / T)"),
    Fault("logprob-formula-ignores-temperature", "hybrid_engine/logprobs.py",
          "        logits = logits / temperature",
          "        logits = logits",
          ("tests/test_engine.py", "tests/test_engine_score.py"),
          "the one logprob formula (every decode path, score, the training forwards) drops T"),
    Fault("fallback-zero-logprobs", "hybrid_engine/engine.py",
          "return GenerationOutput(res.sequences, logprobs.masked_fill(~action_mask, 0.0), action_mask)",
          "return GenerationOutput(res.sequences, torch.zeros_like(logprobs), action_mask)",
          ("tests/test_engine.py",), "the Hugging Face fallback returns all-zero logprobs"),
    Fault("fallback-ignores-temperature", "hybrid_engine/engine.py",
          "token_logprobs(torch.stack(res.logits, dim=1), new, params.temperature)",
          "token_logprobs(torch.stack(res.logits, dim=1), new)",
          ("tests/test_engine.py",), "fallback logprobs of softmax(logits), not softmax(logits / T)"),
    Fault("plain-linear-scaled", "hybrid_engine/models/base.py",
          "return F.linear(x, self.weight, self.bias)",
          "return F.linear(x, self.weight * 1.05, self.bias)",
          ("tests/test_engine_exactness.py",), "the plain F.linear path (the one GPUs take) off by 5%"),
    Fault("conv1d-scaled", "hybrid_engine/models/base.py",
          "out = x @ self.weight",
          "out = x @ (self.weight * 1.05)",
          ("tests/test_engine_exactness.py",), "GPT-2's transposed (Conv1D) branch off by 5%"),
    Fault("sampled-rows-never-stop", "hybrid_engine/generation.py",
          "if eos_ids is not None:",
          "if eos_ids is not None and not params.do_sample:",
          ("tests/test_engine.py",), "EOS ignored when sampling"),
    Fault("pad-equal-eos-masks-eos", "hybrid_engine/generation.py",
          "action_mask[:, t] = alive",
          "action_mask[:, t] = alive & (tok != pad_token_id)",
          ("tests/test_engine_exactness.py",), "with pad id == EOS id the EOS token leaves the action mask"),
    Fault("eos-never-stops", "hybrid_engine/generation.py",
          "finished |= torch.isin(tok, eos_ids)",
          "finished |= torch.isin(tok, eos_ids) & False",
          ("tests/test_engine_exactness.py",), "no row ever stops at EOS"),
    # -- the op builder and dispatch
    Fault("builder-retries-failed-builds", "hybrid_engine/ops/builder.py",
          "        if self.name in _FAILED:",
          "        if False:",
          ("tests/test_ops_dispatch.py",), "a failed build is compiled again on every call"),
    Fault("builder-lets-importerror-escape", "hybrid_engine/ops/builder.py",
          "except (RuntimeError, OSError, ImportError) as err:",
          "except (RuntimeError, OSError) as err:",
          ("tests/test_ops_dispatch.py",), "an unloadable .so crashes auto instead of falling back"),
    Fault("engine-drops-attention-softcap", "hybrid_engine/models/base.py",
          "self.softcap = float(arch.attn_softcap or 0.0)",
          "self.softcap = 0.0",
          ("tests/test_engine_exactness.py::test_greedy_tokens_and_logprobs_match_hugging_face[gemma2-torch]",),
          "Gemma 2's attention logits served uncapped (logprobs 5.6e-3 off on the test config)"),
    Fault("cpu-decode-ignores-softcap", "csrc/cpu/attention.cpp",
          "scores[g * length + s] = soft_cap(dot<T>(&qf[g * D], krow, D), softcap);",
          "scores[g * length + s] = dot<T>(&qf[g * D], krow, D);",
          ("tests/test_ops_cpu.py::test_decode_attention_softcap",),
          "the C++ decode attention drops Gemma 2's soft-capping"),
    Fault("tiles-ignore-shared-memory", "hybrid_engine/kernels/attention.py",
          "SMEM_LIMIT = 163 * 1024",
          "SMEM_LIMIT = 512 * 1024",
          ("tests/test_kernels_triton.py::test_attention_tiles_fit_shared_memory",),
          "fp32 tiles at head dim 256 past the GPU's shared memory"),
    Fault("auto-prefers-cuda-decode", "hybrid_engine/ops/specs.py",
          'auto={"cuda": ("triton", "cuda", "torch")},',
          'auto={"cuda": ("cuda", "triton", "torch")},',
          ("tests/test_ops_dispatch.py",), "auto puts the unmeasured CUDA decode kernel first"),
    Fault("triton-norm-refuses-empty-batch", "hybrid_engine/kernels/norms.py",
          'check(x.dim() >= 1, "norm", "x must have at least 1 dim, got a scalar")',
          'check(x.dim() >= 1 and x.numel() > 0, "norm", "x must be non-empty")',
          ("tests/test_kernels_triton.py",), "a batch of 0 rows is refused"),
    # -- step 3
    Fault("critic-values-one-early", "rlhf/core/experience.py",
          "return critic(sequences, attention_mask)[:, prompt_len - 1:-1].float()",
          "return critic(sequences, attention_mask)[:, prompt_len - 2:-2].float()",
          ("tests/test_ppo_wiring.py",), "values read one position early"),
    Fault("critic-frozen", "rlhf/steps/rl_trainer.py",
          'guarded_update(self.critic, critic_loss, self.guard, self.round, "critic_loss")',
          "None",
          ("tests/test_ppo_wiring.py",), "the critic never steps"),
    Fault("kl-penalty-dropped", "rlhf/steps/rl_trainer.py",
          "exp.action_mask, algo.kl_ctl,",
          "exp.action_mask, 0.0,",
          ("tests/test_ppo_wiring.py",), "rewards without the KL penalty"),
    Fault("kl-loss-dropped", "rlhf/steps/rl_trainer.py",
          "loss = loss + algo.kl_loss_coef * kl",
          "loss = loss + 0.0 * kl",
          ("tests/test_ppo_wiring.py",), "GRPO's KL loss term reported but not trained on"),
    Fault("ratio-unclipped", "rlhf/steps/rl_trainer.py",
          "exp.action_mask, algo.clip,\n                                          algo.clip_high,",
          "exp.action_mask, 1e9,\n                                          1e9,",
          ("tests/test_ppo_wiring.py",), "the policy ratio is never clipped"),
    Fault("gae-lambda-ignored", "rlhf/steps/rl_trainer.py",
          "n, exp.values, algo.gamma, algo.lam,",
          "n, exp.values, algo.gamma, 1.0,",
          ("tests/test_ppo_wiring.py",), "GAE with lambda 1 whatever --lam says"),
    Fault("groups-interleaved", "rlhf/steps/rl_trainer.py",
          'ids = batch["input_ids"].repeat_interleave(n_samples, dim=0)',
          'ids = batch["input_ids"].repeat(n_samples, 1)',
          ("tests/test_ppo_wiring.py",), "a prompt's samples not in consecutive rows: groups mix prompts"),
    Fault("grpo-never-divides-by-std", "rlhf/core/advantages.py",
          "    if x.std_normalization:",
          "    if False:",
          ("tests/test_advantages.py",), "GRPO is always Dr.GRPO"),
    Fault("rloo-baseline-includes-itself", "rlhf/core/advantages.py",
          "baseline = (scores.sum(-1, keepdim=True) - scores) / (G - 1)",
          "baseline = scores.mean(-1, keepdim=True)",
          ("tests/test_advantages.py",), "RLOO's baseline is the group mean"),
    Fault("clip-high-ignored", "rlhf/core/losses.py",
          "clip_high = clip if clip_high is None else clip_high",
          "clip_high = clip",
          ("tests/test_advantages.py",), "DAPO's clip-higher has no effect"),
    Fault("reward-score-one-early", "rlhf/models.py",
          "return T - 1 - attention_mask.flip(1).long().argmax(dim=1)",
          "return T - 2 - attention_mask.flip(1).long().argmax(dim=1)",
          ("tests/test_models.py", "tests/test_ppo_wiring.py"), "sequence score read at the token before the last",
          retrain=True),
    Fault("frozen-models-take-trainee-stage", "rlhf/runtime/engines.py",
          "return 3 if trainee_stage == 3 else 0",
          "return trainee_stage",
          ("tests/test_step3_matrix.py",), "the landed ZeRO-1/2 step-3 crash"),
    Fault("step3-ignores-actor-model", "rlhf/cli/train.py",
          'return paths["actor"] if 1 in args.step else args.actor_model or paths["actor"]',
          'return paths["actor"]',
          ("tests/test_step3_matrix.py::test_step3_row[zero0-0]",), "the landed --step 3 path bug"),
    Fault("nan-reward-trained", "rlhf/steps/rl.py",
          "if not trainer.guard.ok(step, reward=exp.scores, advantage=exp.advantages):",
          "if False:",
          ("tests/test_resume.py::test_a_nan_reward_skips_that_update_and_is_counted",),
          "a NaN reward (a reward function's) is trained on instead of skipped"),
    # -- runs that survive (issue 9), reused rollout logprobs and engine.score (issue 10), the compiled step (11)
    Fault("resume-skips-sampling-generator", "rlhf/runtime/resume.py",
          '        g.set_state(state["generators"][name])',
          "        pass",
          ("tests/test_resume.py::test_sigkill_then_resume_is_bit_identical",),
          "a resumed run samples other rollouts than the uninterrupted one"),
    Fault("resume-keeps-stale-metrics", "rlhf/runtime/resume.py",
          'truncate_metrics(self.metrics_path, meta["metrics_length"])',
          "None",
          ("tests/test_resume.py::test_resume_cuts_metrics_back_to_the_checkpoint",),
          "records written after the checkpoint appear twice after a resume"),
    Fault("sigterm-ignored", "rlhf/runtime/guards.py",
          "return _any_rank(self.received is not None)",
          "return False",
          ("tests/test_resume.py::test_sigterm_checkpoints_says_how_to_resume_and_resumes_exactly",),
          "SIGTERM neither checkpoints nor stops: the run is killed later with nothing saved"),
    Fault("nonfinite-loss-trained", "rlhf/runtime/guards.py",
          "bad = [name for name, value in quantities.items() if value is not None and not _finite(value)]",
          "bad = []",
          ("tests/test_guards.py",), "a NaN loss is backpropagated and stepped"),
    Fault("nonfinite-gradient-stepped", "rlhf/runtime/guards.py",
          "if engine.is_gradient_accumulation_boundary() and not guard.ok(step, gradient_norm=_gradient_norm(engine)):",
          "if False:",
          ("tests/test_guards.py",), "a NaN gradient under a finite loss reaches the weights (ZeRO-0 fp32)"),
    Fault("reused-logprobs-never-audited", "rlhf/steps/rl_trainer.py",
          "audit = bool(interval) and self.rollouts % interval == 0",
          "audit = False",
          ("tests/test_logprob_reuse.py",), "the rollout/training logprob gap is never measured"),
    Fault("engine-score-one-early", "hybrid_engine/engine.py",
          "keep = T - prompt_len + 1",
          "keep = T - prompt_len + 2",
          ("tests/test_engine_score.py",), "reference logprobs read one position early"),
    Fault("dpo-reference-ignored", "rlhf/core/losses.py",
          "h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)",
          "h = policy_chosen_logps - policy_rejected_logps",
          ("tests/test_dpo.py",), "DPO without its reference: an unregularised margin"),
    Fault("static-step-positions-frozen", "hybrid_engine/static.py",
          "    state.positions.add_(1)\n",
          "\n",
          ("tests/test_engine_compile.py::test_compiled_step_matches_eager_and_hugging_face",),
          "the compiled step feeds every token at the first decode position"),
    Fault("static-step-stops-at-first-eos", "hybrid_engine/static.py",
          "bool(state.finished.all())",
          "bool(state.finished.any())",
          ("tests/test_engine_compile.py::test_eos_checked_every_k_steps_gives_the_eager_output",),
          "the compiled loop ends when one row stops instead of all"),
    # -- stop 15's fixes
    Fault("tie-counts-as-wrong", "rlhf/core/losses.py",
          "+ 0.5 * (chosen_scores == rejected_scores).float()",
          "+ 0.0 * (chosen_scores == rejected_scores).float()",
          ("tests/test_losses.py",), "an untrained DPO policy reads accuracy 0, below chance"),
    Fault("reporters-not-rebuilt-after-resume", "rlhf/runtime/metrics.py",
          "if not self.reporters or self._length() >= self.length:",
          "if True:",
          ("tests/test_metrics.py",), "TensorBoard shows the rounds after a checkpoint twice after --resume"),
    Fault("finished-step-keeps-its-checkpoints", "rlhf/runtime/resume.py",
          "            self.run.finish(name, done)\n            if self.is_main:\n                ckpt.remove()\n",
          "            self.run.finish(name, done)\n",
          ("tests/test_resume.py::test_a_finished_run_keeps_no_checkpoints",),
          "GBs of optimizer state left behind for steps --resume never reads again"),
    Fault("sft-rising-loss-silent", "rlhf/steps/sft.py",
          "if initial is None or not final > initial:",
          "if True:",
          ("tests/test_sft_reward.py",), "SFT wrecks a pretrained model (lr 1e-3) without a word"),
    Fault("build-dir-ignores-source-content", "hybrid_engine/ops/builder.py",
          'digest.update(str(path.relative_to(CSRC)).encode() + b"\\0" + path.read_bytes() + b"\\0")',
          "pass",
          ("tests/test_ops_dispatch.py",), "an edited C++ source loads the stale build of the old one"),
    Fault("cache-key-ignores-torch-build", "hybrid_engine/ops/builder.py",
          '"torch_git": str(torch.version.git_version),',
          '"torch_git": "",',
          ("tests/test_op_cache.py::test_the_key_changes_with_each_of_its_inputs",),
          "two torch builds of one version load each other's library"),
    Fault("cache-key-names-the-venv", "hybrid_engine/ops/builder.py",
          '"torch": torch.__version__,',
          '"torch": torch.__version__ + torch.__file__,',
          ("tests/test_op_cache.py::test_the_key_ignores_where_torch_and_the_checkout_live",),
          "every virtualenv recompiles the C++ ops (70-110 s) although its torch build is the same"),
    Fault("killed-build-scratch-reused", "hybrid_engine/ops/builder.py",
          "        shutil.rmtree(scratch, ignore_errors=True)\n        scratch.mkdir()",
          "        scratch.mkdir(exist_ok=True)",
          ("tests/test_op_cache.py::test_a_killed_build_leaves_no_library_and_the_next_build_starts_clean",),
          "a build killed mid-way leaves objects and torch's lock file that the next build trusts or waits on"),
    Fault("chat-template-sees-last-turn-only", "rlhf/data/tokenize.py",
          "return tokenizer.apply_chat_template(_chat(messages), tokenize=False, add_generation_prompt=True)",
          "return tokenizer.apply_chat_template(_chat(messages[-1:]), tokenize=False, add_generation_prompt=True)",
          ("tests/test_data.py",), "a multi-turn conversation reaches the model as its last question alone"),
    Fault("step-ends-without-barrier", "rlhf/runtime/resume.py",
          "barrier()  # rank 0 saved the step's output", "pass  # rank 0 saved the step's output",
          ("tests/test_distributed.py::test_two_process_pipeline_runs_every_step",),
          "rank 1 reads step 2's reward model in step 3 before rank 0 has saved it"),
    Fault("multi-process-exit-through-shutdown", "rlhf/runtime/process.py", "    os._exit(code)", "    return code",
          ("tests/test_distributed.py::test_end_process_ends_every_rank_with_its_code_and_output",),
          "a two-process run ends in the interpreter's shutdown, where gloo ranks abort now and then"),
    Fault("tp-split-checked-only-at-first-eval", "rlhf/cli/train.py", "    require_tp_split(args, cfg)\n", "",
          ("tests/test_bad_input.py::test_an_inference_tp_size_that_does_not_split_the_heads_is_refused_before_any_step",),
          "SmolLM2's 9 heads over --inference-tp-size 2: a traceback after steps 1 and 2 have trained"),
    Fault("resume-hint-drops-the-launch", "rlhf/cli/train.py", "    if world > 1:\n        local =",
          "    if False:\n        local =",
          ("tests/test_resume.py::test_the_resume_command_keeps_the_process_count",),
          "a stopped 2-process run says `rlhf train ... --resume`, which one process refuses"),
    Fault("reporters-left-open-at-exit", "rlhf/cli/train.py", "    with StopSignal() as stop, metrics:",
          "    with StopSignal() as stop:",
          ("tests/test_distributed.py::test_two_process_pipeline_runs_every_step",),
          "a multi-process run ends through os._exit with its W&B run never finished (an empty run file)"),
    # -- issue 19: one training loop for every step
    Fault("resume-redraws-the-first-epoch", "rlhf/runtime/loop.py",
          "            list(self.loader.sampler)\n", "            pass\n",
          ("tests/test_loop.py",), "a run resumed in its second epoch or later trains on other batches than the "
          "killed one would have"),
    # -- options that change an update's math, applied wrongly while the run still goes through (issue 19 item 7)
    Fault("ema-decay-swapped", "rlhf/steps/rl_trainer.py",
          "ema_p.mul_(self.cfg.algo.ema_decay).add_(p.detach().to(ema_p.dtype), alpha=1 - self.cfg.algo.ema_decay)",
          "ema_p.mul_(1 - self.cfg.algo.ema_decay).add_(p.detach().to(ema_p.dtype), alpha=self.cfg.algo.ema_decay)",
          (f"{UPDATE_MATH}::test_ema_moves_toward_the_updated_actor_by_one_minus_decay",),
          "the EMA keeps 1 - decay of itself: actor_ema/ is about the last actor, not an average"),
    Fault("ptx-coef-ignored", "rlhf/steps/rl_trainer.py",
          "guarded_update(self.actor, cfg.algo.unsup_coef * ptx,", "guarded_update(self.actor, ptx,",
          (f"{UPDATE_MATH}::test_ptx_step_is_the_lm_loss_times_unsup_coef",), "--unsup-coef has no effect"),
    Fault("ptx-coef-squared", "rlhf/steps/rl_trainer.py",
          "guarded_update(self.actor, cfg.algo.unsup_coef * ptx,",
          "guarded_update(self.actor, cfg.algo.unsup_coef ** 2 * ptx,",
          (f"{UPDATE_MATH}::test_ptx_step_is_the_lm_loss_times_unsup_coef",), "the PTX loss weighted by unsup_coef^2"),
    Fault("kl-ctl-read-from-kl-loss-coef", "rlhf/steps/rl_config.py",
          "kl_ctl=self.kl_ctl,", "kl_ctl=self.kl_loss_coef,",
          (UPDATE_MATH,), "the reward's KL penalty takes the KL loss term's coefficient (0 for ppo: no penalty)"),
    Fault("kl-estimator-ignored", "rlhf/steps/rl_trainer.py",
          "kl_divergence(logprobs, exp.ref_logprobs, exp.action_mask, algo.kl_estimator)",
          'kl_divergence(logprobs, exp.ref_logprobs, exp.action_mask, "k1")',
          (f"{UPDATE_MATH}::test_actor_step_backpropagates_the_clipped_surrogate_plus_the_kl_loss",),
          "the KL loss term is k1 whatever --kl-estimator says (GRPO's k3 included)"),
    Fault("k3-computed-as-k1", "rlhf/core/losses.py",
          "\"k3\": lambda d: torch.exp(d) - d - 1.0", "\"k3\": lambda d: -d",
          (f"{UPDATE_MATH}::test_actor_step_backpropagates_the_clipped_surrogate_plus_the_kl_loss",),
          "the k3 estimator is k1: a KL loss that can go negative"),
    Fault("k3-exponent-before-mask", "rlhf/core/losses.py",
          "d = (ref_logprobs - logprobs).masked_fill(~mask, 0.0)", "d = ref_logprobs - logprobs",
          ("tests/test_losses.py::test_kl_loss_is_finite_whatever_the_logprobs_off_the_mask",),
          "k3's exp of the off-mask log-ratio overflows to inf and the mask after it makes the KL loss NaN (issue 24)"),
    Fault("cispo-weight-carries-gradient", "rlhf/core/losses.py",
          "ratio = torch.exp(masked_log_ratio(logprobs, old_logprobs, action_mask)).detach()  # (B, N)",
          "ratio = torch.exp(masked_log_ratio(logprobs, old_logprobs, action_mask))  # (B, N)",
          ("tests/test_policy_losses.py", f"{WIRING}::test_new_policy_losses_reach_the_actors_gradient"),
          "CISPO's importance weight is not stop-gradient: clipped tokens lose their gradient as in PPO"),
    Fault("gspo-ratio-per-token", "rlhf/core/losses.py",
          "s = torch.exp(sequence_log_ratio(logprobs, old_logprobs, action_mask))[:, None]  # (B, 1)",
          "s = torch.exp(masked_log_ratio(logprobs, old_logprobs, action_mask))  # (B, 1)",
          ("tests/test_policy_losses.py", f"{WIRING}::test_new_policy_losses_reach_the_actors_gradient"),
          "GSPO clips each token's ratio instead of the sequence's geometric mean"),
    Fault("rollout-correction-not-applied", "rlhf/steps/rl_trainer.py",
          "                                             exp.correction)",
          "                                             None)",
          (f"{WIRING}::test_rollout_correction_needs_the_training_forward_and_weighs_the_actor_loss",),
          "the correction's weights are logged but never reach the policy loss"),
    Fault("rollout-correction-on-reused-logprobs", "rlhf/steps/rl_trainer.py",
          'if cfg.algo.rollout_correction != "none":', "if False:",
          (f"{WIRING}::test_rollout_correction_needs_the_training_forward_and_weighs_the_actor_loss",),
          "the correction weighs the rollout's logprobs against themselves: every weight 1"),
    Fault("distill-ignores-the-teacher", "rlhf/steps/rl_trainer.py",
          "teacher = None if exp.teacher_logprobs is None else (exp.teacher_logprobs - exp.logprobs) * exp.action_mask",
          "teacher = None if exp.teacher_logprobs is None else exp.logprobs * 0",
          (f"{WIRING}::test_distill_scores_the_students_tokens_with_the_teacher",),
          "distill's advantage without the teacher's logprobs"),
    Fault("dynamic-sampling-keeps-ties", "rlhf/core/dynamic_sampling.py",
          "varied = (groups != groups[:, :1]).any(-1)", "varied = (groups == groups).any(-1)",
          ("tests/test_policy_losses.py",
           f"{WIRING}::test_dynamic_sampling_keeps_informative_groups_until_the_batch_is_full"),
          "DAPO keeps groups whose rewards are all equal"),
    Fault("overlong-penalty-dropped", "rlhf/steps/rl_trainer.py",
          "        if algo.overlong_buffer:", "        if False:",
          (f"{WIRING}::test_dapo_adds_the_soft_overlong_penalty_to_the_scores",),
          "DAPO's soft overlong penalty never applied"),
    Fault("kl-loss-on-old-logprobs", "rlhf/steps/rl_trainer.py",
          "kl_divergence(logprobs, exp.ref_logprobs, exp.action_mask, algo.kl_estimator)",
          "kl_divergence(exp.logprobs, exp.ref_logprobs, exp.action_mask, algo.kl_estimator)",
          (f"{UPDATE_MATH}::test_actor_step_backpropagates_the_clipped_surrogate_plus_the_kl_loss",),
          "the KL loss term of the rollout's logprobs: logged, but no gradient"),
    Fault("clip-high-not-passed", "rlhf/steps/rl_trainer.py",
          "algo.clip_high, algo.loss_agg, cfg.sampling.max_answer_seq_len)",
          "algo.clip, algo.loss_agg, cfg.sampling.max_answer_seq_len)",
          (f"{UPDATE_MATH}::test_actor_step_backpropagates_the_clipped_surrogate_plus_the_kl_loss",),
          "--cliprange-high never reaches the policy loss"),
    Fault("sum-norm-by-answer-width", "rlhf/steps/rl_trainer.py",
          "algo.clip_high, algo.loss_agg, cfg.sampling.max_answer_seq_len)", "algo.clip_high, algo.loss_agg, None)",
          (f"{UPDATE_MATH}::test_actor_step_backpropagates_the_clipped_surrogate_plus_the_kl_loss",),
          "Dr.GRPO's policy loss normalised by the minibatch's longest answer, not --max-answer-seq-len"),
    Fault("sum-norm-by-row-length", "rlhf/core/losses.py",
          "return (losses * mask).sum() / (losses.shape[0] * (norm_len or losses.shape[1]))",
          "return ((losses * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()",
          (f"{UPDATE_MATH}::test_actor_step_backpropagates_the_clipped_surrogate_plus_the_kl_loss",),
          "seq-mean-token-sum-norm divides each row by its own length: GRPO's length bias is back"),
    Fault("cliprange-value-ignored", "rlhf/steps/rl_trainer.py",
          "exp.action_mask, cfg.algo.cliprange_value)", "exp.action_mask, 1e9)",
          (f"{UPDATE_MATH}::test_critic_step_clips_values_at_cliprange_value",), "the value loss is never clipped"),
    Fault("clip-reward-value-not-applied", "rlhf/steps/rl_trainer.py",
          "algo.kl_ctl,\n                                           self.cfg.algo.clip_reward_value)",
          'algo.kl_ctl,\n                                           float("inf"))',
          (f"{UPDATE_MATH}::test_rollout_rewards_and_advantages_follow_the_formulas",),
          "reward scores enter the per-token rewards unclipped"),
    Fault("baseline-scores-unclipped", "rlhf/steps/rl_trainer.py",
          "clipped = exp.scores.clamp(-self.cfg.algo.clip_reward_value, self.cfg.algo.clip_reward_value)",
          "clipped = exp.scores",
          (f"{UPDATE_MATH}::test_rollout_rewards_and_advantages_follow_the_formulas",),
          "reinforce++-baseline subtracts the group mean of the unclipped scores from the clipped ones"),
    Fault("whitening-skipped", "rlhf/core/advantages.py",
          "return whiten(returns, x.action_mask), returns", "return returns, returns",
          (f"{UPDATE_MATH}::test_rollout_rewards_and_advantages_follow_the_formulas",),
          "reinforce++ trains on raw returns, not batch-whitened ones"),
    Fault("reinforce-baseline-gamma-ignored", "rlhf/core/advantages.py",
          "returns = discounted_returns(rewards, mask, x.gamma)", "returns = discounted_returns(rewards, mask, 1.0)",
          (f"{UPDATE_MATH}::test_rollout_rewards_and_advantages_follow_the_formulas",),
          "reinforce++-baseline never discounts, whatever --gamma says"),
    Fault("gae-lambda-one-in-the-loop", "rlhf/core/losses.py",
          "next_advantage = delta + gamma * lam * next_advantage", "next_advantage = delta + gamma * next_advantage",
          (f"{UPDATE_MATH}::test_rollout_rewards_and_advantages_follow_the_formulas",),
          "GAE's recursion without lambda (lambda 1: Monte-Carlo advantages)"),
    Fault("no-std-normalization-ignored", "rlhf/steps/rl_config.py",
          "self.std_normalization, self.gamma, self.lam,", "True, self.gamma, self.lam,",
          (f"{UPDATE_MATH}::test_rollout_rewards_and_advantages_follow_the_formulas",
           f"{UPDATE_MATH}::test_explicit_options_override_every_algorithms_defaults"),
          "--no-std-normalization (Dr.GRPO) is read but GRPO still divides by the std"),
    Fault("rloo-default-kl-changed", "rlhf/core/algorithms.py",
          'declare(AlgorithmSpec("rloo", "rloo", "ppo-clip", 4, 0.05,',
          'declare(AlgorithmSpec("rloo", "rloo", "ppo-clip", 4, 0.5,',
          (f"{UPDATE_MATH}::test_rollout_rewards_and_advantages_follow_the_formulas",
           f"{UPDATE_MATH}::test_per_algorithm_defaults_are_readmes_table"),
          "rloo's KL penalty ten times README's 0.05"),
    Fault("grpo-default-loss-agg-changed", "rlhf/core/algorithms.py",
          '"ppo-clip", 4, 0.0, 0.04, "seq-mean-token-mean",',
          '"ppo-clip", 4, 0.0, 0.04, "token-mean",',
          (f"{UPDATE_MATH}::test_actor_step_backpropagates_the_clipped_surrogate_plus_the_kl_loss",
           f"{UPDATE_MATH}::test_per_algorithm_defaults_are_readmes_table"),
          "grpo's default aggregation is token-mean, not README's seq-mean-token-mean"),
    # -- mixture of experts (issue 21)
    Fault("moe-experts-unweighted", "hybrid_engine/ops/reference.py",
          "weighted = out * expert_weights.reshape(-1)[order, None]", "weighted = out",
          ("tests/test_ops_moe.py",), "each token's k experts summed without the router's weights"),
    Fault("moe-qwen-always-renormalises", "hybrid_engine/models/qwen_moe.py",
          "renormalize=cfg.norm_topk_prob,", "renormalize=True,",
          (f"{EXACT}::test_greedy_tokens_and_logprobs_match_hugging_face[qwen3_moe-torch]",),
          "Qwen3-MoE's top-k weights renormalised though its norm_topk_prob is False"),
    Fault("moe-shared-expert-ungated", "hybrid_engine/models/base.py",
          "out = out + torch.sigmoid(experts.shared_gate(x)) * self._gated_mlp(layer, x)",
          "out = out + self._gated_mlp(layer, x)",
          (f"{EXACT}::test_greedy_tokens_and_logprobs_match_hugging_face[qwen2_moe-torch]",),
          "Qwen2-MoE's shared expert added without its sigmoid gate"),
    Fault("moe-expert-lora-dropped", "hybrid_engine/models/common.py",
          "deltas.append(delta)", "deltas.clear()",
          (f"{EXACT}::test_optimizer_step_is_read_after_eval[mixtral-lora]",),
          "LoRA on PEFT-wrapped parameters (Mixtral's router and experts) ignored by the inference path"),
    # -- the TRL adapter (issue 23)
    Fault("trl-old-logprobs-shifted", "hybrid_engine/integrations/trl.py",
          "        return old.to(input_ids.device)", "        return old.roll(1, dims=1).to(input_ids.device)",
          (f"{TRL}::test_rollout_logprobs_replace_trls_old_logprob_forward",),
          "the rollout logprobs handed to TRL as old logprobs one column off"),
    Fault("trl-old-forward-never-audited", "hybrid_engine/integrations/trl.py",
          "if old is not None and not self._audit_due():", "if old is not None:",
          (f"{TRL}::test_rollout_logprobs_replace_trls_old_logprob_forward",),
          "TRL's old-logprob forward skipped on every rollout, the audit too"),
    Fault("trl-sampling-settings-dropped", "hybrid_engine/integrations/trl.py",
          "sampling=self._sampling, keep_cache=keep)", "keep_cache=keep)",
          (f"{TRL}::test_grpo_samples_trls_tokens_and_its_forwards_logprobs",),
          "the engine generates greedily instead of with TRL's temperature, top_p, top_k"),
    Fault("trl-fp32-generation-under-bf16", "hybrid_engine/integrations/trl.py",
          '"autocast_dtype": self._autocast_dtype(),', '"autocast_dtype": None,',
          (f"{TRL}::test_bf16_autocast_gap_is_within_hfs_own_attention_spread",),
          "bf16=True trains under autocast while the engine generates in fp32"),
]


def copy_tree(dest: Path) -> None:
    """The working tree as it is (tracked and untracked files git does not ignore) into dest."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def plant(copy: Path, fault: Fault) -> None:
    path = copy / fault.path
    text = path.read_text()
    count = text.count(fault.old)
    if count != 1:
        raise SystemExit(f"mutation_check: {fault.name}: expected the text once in {fault.path}, found {count}: "
                         f"{fault.old!r}")
    path.write_text(text.replace(fault.old, fault.new))


def run_tests(copy: Path, tests: list[str], env: dict) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=copy,
                          env=env, capture_output=True, text=True)
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode, (failed[0] if failed else proc.stdout.strip().splitlines()[-1] if proc.stdout else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plant known faults one at a time and report which the tests catch")
    parser.add_argument("names", nargs="*", help="faults to plant (default: all)")
    parser.add_argument("--full", action="store_true", help="run the whole suite for each fault")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the first run of the aimed tests with no fault planted (they must pass, or a "
                             "'caught' means nothing)")
    args = parser.parse_args(argv)
    faults = [f for f in FAULTS if not args.names or f.name in args.names]
    if args.list or not faults:
        for f in FAULTS:
            print(f"{f.name:<36} {f.path:<32} {' '.join(f.tests)}")
        return 0 if faults else 2
    stale = [f"{f.name} ({f.path}: found {(ROOT / f.path).read_text().count(f.old)} times)" for f in faults
             if (ROOT / f.path).read_text().count(f.old) != 1]
    if stale:  # before any test runs, not a quarter of an hour in
        raise SystemExit(f"mutation_check: the text of {len(stale)} fault(s) does not occur exactly once, move it "
                         f"with its line: {'; '.join(stale)}")
    caught = 0
    with tempfile.TemporaryDirectory(prefix="mutation_") as tmp:
        pristine, tiny_run = Path(tmp) / "pristine", Path(tmp) / "tiny_run"
        copy_tree(pristine)  # one snapshot: editing the checkout meanwhile changes nothing here
        # a build cache of its own: a planted C++ fault must not land in the user's cache
        env = dict(os.environ, HYBRID_ENGINE_CACHE=str(Path(tmp) / "build"), PYTHONDONTWRITEBYTECODE="1",
                   PYTHONPATH=str(pristine))  # the copy's packages, not the editable install's
        subprocess.run([sys.executable, "-m", "rlhf.train", "--step", "1", "2", "--output-dir", str(tiny_run),
                        "--disable-tqdm"], cwd=pristine, env=env, check=True, capture_output=True)
        if not args.no_baseline:
            aimed = sorted({t for f in faults for t in f.tests})
            env["RLHF_TESTS_TINY_RUN"] = str(tiny_run)
            rc, first = run_tests(pristine, ["tests"] if args.full else aimed, env)
            print(f"{'ok' if rc == 0 else 'FAILED':<7} {'(no fault: the aimed tests pass)':<36} {first}", flush=True)
            if rc != 0:
                return 2
            del env["RLHF_TESTS_TINY_RUN"]
        for fault in faults:
            copy = Path(tmp) / fault.name
            shutil.copytree(pristine, copy)
            plant(copy, fault)
            fault_env = dict(env, PYTHONPATH=str(copy))
            if not fault.retrain:
                fault_env["RLHF_TESTS_TINY_RUN"] = str(tiny_run)
            start = time.time()
            rc, first = run_tests(copy, ["tests"] if args.full else list(fault.tests), fault_env)
            hit = rc != 0
            caught += hit
            print(f"{'CAUGHT' if hit else 'MISSED':<7} {fault.name:<36} {time.time() - start:6.0f} s  {first}",
                  flush=True)
            shutil.rmtree(copy)
    print(f"{caught} of {len(faults)} planted faults caught")
    return 0 if caught == len(faults) else 1


if __name__ == "__main__":
    sys.exit(main())
