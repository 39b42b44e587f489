"""How the student learns: the KD loss, LoRA, on-policy rounds, and the Ray Train + DeepSpeed run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distill.config.common import Strict


class KDLossConfig(Strict):
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """Divergence between the teacher's top-k and the student's distribution."""
    beta: float = Field(0.5, ge=0.0, le=1.0)
    """JSD mixing weight (0 and 1 are the two KLs)."""
    temperature: float = Field(1.0, gt=0.0)
    """Softens both distributions; the KD term is scaled by T^2."""
    kd_weight: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the KD term against the hard-label CE: 1 = pure logit KD, 0.5 = an even mix."""
    hidden_weight: float = Field(0.0, ge=0.0)
    """Weight of a hidden-state term added to the loss: the teacher (`teacher.path`, loaded in each
    training worker) reads the student's own input, and the student's hidden states are pulled
    toward the teacher's at every token, prompt included (relative squared error). 0: off. Needs
    a student of the teacher's hidden size; each step also runs the teacher forward."""
    hidden_layers: Literal["last", "all"] = "last"
    """Which states the hidden-state term pairs: `last`, the final (normed) state, which the output
    head reads; `all`, also each student layer's output with the output of the teacher layer it
    was copied from (a derived student of the teacher's own layers)."""


class LoraConfig(Strict):
    """Train low-rank adapters instead of all weights (peft); merged into the export."""

    r: int = Field(16, ge=1)
    """Adapter rank."""
    alpha: int = Field(32, ge=1)
    """Adapter scale."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Adapter dropout."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      min_length=1)
    """Modules that get adapters."""


class OnPolicyConfig(Strict):
    """On-policy distillation (GKD): the student samples, the teacher scores every token it wrote."""

    steps: int = Field(40, ge=1)
    """Optimizer steps of on-policy training, after the `training.epochs` off-policy epochs
    (with `training.epochs: 0`, instead of them)."""
    rollouts_per_step: int = Field(8, ge=1)
    """Prompts the student answers per step and worker (one rollout each)."""
    max_new_tokens: int = Field(16, ge=1)
    """Rollout length limit."""
    temperature: float = Field(1.0, ge=0.0)
    """The student's sampling temperature (1: its own distribution, as GKD samples)."""
    lambda_mix: float = Field(0.0, ge=0.0, le=1.0)
    """Share of steps that train on the teacher's stored outputs instead (GKD's lambda is 1 - this)."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "reverse_kl"
    """Per-token divergence on the student's rollouts, on the teacher's top-k + rest partition.
    reverse KL pulls the student off tokens the teacher would not write; it needs a student that
    already puts mass on the teacher's top-k (after off-policy epochs): from a random student its
    gradient nearly vanishes, so start from scratch with forward_kl."""
    beta: float = Field(0.5, ge=0.0, le=1.0)
    """JSD mixing weight with divergence=jsd."""
    sync_every: int = Field(1, ge=1)
    """Optimizer steps between weight syncs from the trainer to the student sampler."""
    sync_via: Literal["object_store", "file"] = "object_store"
    """How weights reach the sampler: Ray's object store, or a safetensors file in the run directory."""
    seed: int = 0
    """Seed of the prompt draw and of the mixing schedule."""


class TrainingConfig(Strict):
    method: Literal["sequence", "logit", "on_policy"] = "sequence"
    """sequence: CE on the teacher's text; logit: also match its stored top-k (kd.kd_weight mixes);
    on_policy: logit-level epochs, then `on_policy.steps` on the student's own samples."""
    on_policy: OnPolicyConfig = OnPolicyConfig()
    """Settings of method=on_policy."""
    kd: KDLossConfig = KDLossConfig()
    """Logit-level KD loss."""
    allow_sequence_fallback: bool = False
    """With method=logit and text-only curated rows (an endpoint teacher without
    teacher.tokenizer): fall back to sequence KD instead of refusing."""
    freeze_embeddings: bool = False
    """Keep the input embeddings (and a tied output head) fixed: fewer trainable parameters, and
    words the training set never shows keep their pretrained meaning."""
    freeze_layers: int = Field(0, ge=0)
    """Keep the student's first this-many decoder layers fixed as well (0: none): fewer weights to
    train and keep optimizer state for, and backward stops above them. Whether it helps a task is
    a choice for the validation split (bench/README.md)."""
    gold_control: bool = False
    """Also train the same student on the gold references alone (no teacher), exported to
    `student_gold/` and shown in the report: what the teacher adds."""
    learning_rate: float = Field(5e-4, gt=0.0)
    """Peak learning rate (warmup, then cosine)."""
    batch_size: int = Field(8, ge=1)
    """Micro-batch per worker."""
    gradient_accumulation: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    epochs: int = Field(3, ge=0)
    """Passes over the curated examples (0 only with method=on_policy: on-policy steps alone)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps, however many epochs that takes (overrides `epochs`;
    on-policy steps come after them)."""
    max_validation_rows: int | None = Field(None, ge=1)
    """Compute the validation loss on the first this-many validation examples (all when unset):
    at millions of rows a full pass each epoch costs more than the epoch's steps."""
    max_seq_len: int = Field(256, ge=8)
    """Prompt + response tokens per example (longer ones are cut)."""
    move_instruction: float = Field(0.0, ge=0.0, le=1.0)
    """Chance that a train example's prompt reaches the student with its instruction at the other
    end of the text ("Positive or negative?" under the review, not above it;
    `distill.chat.split_instruction`), drawn per example by `seed`. The teacher answered it as asked:
    its answer and top-k stay. A student that only saw the question in one place answers it
    elsewhere by where it stands, not by the text."""
    average_from: float | None = Field(None, ge=0.0, lt=1.0)
    """Export the uniform average of the weights after each optimizer step past this share of
    the steps (stochastic weight averaging; 0.5: the second half), not the last step's weights:
    the mean of the late, low-learning-rate iterates, which depends less on the order of the last
    batches (`distill.weight_average`). Off when null; zero_stage 0-2, not with on_policy."""
    neftune_alpha: float | None = Field(None, gt=0.0)
    """Noisy embeddings (NEFTune): while training, uniform noise of half-width alpha / sqrt(tokens x
    hidden size) is added to the student's input embeddings, so a word reaches it a little off its
    place, as an unseen neighbour would; the teacher of the hidden-state term reads the clean input,
    and evaluation and serving see none. Off when null; the paper's values are 5 to 15."""
    neftune_from: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of the training steps before the noise of `neftune_alpha` starts (0: from the first
    step; 0.5: the second half, the student first learning from the clean words)."""
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the student's attention weights while it trains (its model config's
    `attention_dropout`, which Llama-type models read in train mode only), so that no single word
    it attends to decides an answer alone; the exported model keeps the value it was loaded with.
    0: off, as the model ships."""
    teacher_state_cache_gib: float = Field(2.0, ge=0.0)
    """Host memory each worker may fill with the hidden-state term's teacher states
    (`kd.hidden_weight`) for the rows it has read, so that later epochs and validation passes
    read them instead of running the teacher again: the teacher is frozen and reads a row's fixed
    tokens, so its states for the row never change. Rows past the limit are computed each time;
    0 computes every row each time."""
    cache_examples: Literal["auto", "always", "never"] = "auto"
    """Tokenize the training examples once, before the first step, and keep them in Ray's object
    store for every epoch (`always`), or stream them from the curated files, tokenized again in
    each epoch (`never`: memory stays a few blocks, whatever the data's size). `auto` keeps them
    when their largest possible size (rows x max_seq_len x (8 + 8 x top-k) bytes) fits in a
    quarter of the cluster's object store."""
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    """Share of steps spent warming up."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Gradient norm clip (0 = off)."""
    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 where the hardware computes it natively, else fp32."""
    workers: int = Field(1, ge=1)
    """Ray Train workers (one GPU each with use_gpu)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs (and torch threads) per worker."""
    use_gpu: bool = False
    """Train on GPUs."""
    checkpoint_every_steps: int = Field(50, ge=1)
    """Optimizer steps between DeepSpeed checkpoints."""
    max_failures: int = Field(1, ge=0)
    """Worker failures Ray Train recovers from (resuming from the last checkpoint)."""
    log_every_steps: int = Field(10, ge=1)
    """Steps between progress lines."""
    seed: int = 0
    """Seed of initialisation-independent randomness (data order, dropout)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights."""

    @model_validator(mode="after")
    def _lora_needs_whole_weights(self) -> "TrainingConfig":
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("LoRA runs with zero_stage 0-2 (its adapters are merged into whole "
                             "weights for export); set training.zero_stage=2 or drop training.lora")
        return self

    @model_validator(mode="after")
    def _frozen_layers_need_whole_weights(self) -> "TrainingConfig":
        if self.freeze_layers and self.lora is not None:
            raise ValueError("training.freeze_layers fixes whole layers, and LoRA already fixes every base weight: "
                             "set training.freeze_layers=0 or drop training.lora")
        return self

    @model_validator(mode="after")
    def _noise_to_start(self) -> "TrainingConfig":
        if self.neftune_from and self.neftune_alpha is None:
            raise ValueError(f"training.neftune_from={self.neftune_from} starts noise that training.neftune_alpha "
                             "does not add: set training.neftune_alpha (5 to 15), or training.neftune_from=0")
        return self

    @model_validator(mode="after")
    def _average_needs_whole_weights(self) -> "TrainingConfig":
        if self.average_from is not None and self.zero_stage == 3:
            raise ValueError("training.average_from averages whole weights on each worker: set "
                             "training.zero_stage to 0, 1 or 2, or training.average_from=null")
        if self.average_from is not None and self.method == "on_policy":
            raise ValueError("training.average_from averages the off-policy steps, and on-policy steps would start "
                             "from the average: set training.average_from=null with training.method=on_policy")
        return self

    @model_validator(mode="after")
    def _on_policy_limits(self) -> "TrainingConfig":
        if self.epochs == 0 and self.method != "on_policy":
            raise ValueError("training.epochs=0 trains nothing: set training.epochs >= 1 "
                             "(0 is for training.method=on_policy alone)")
        if self.method != "on_policy":
            return self
        # the sampler receives the trained layers in place (vLLM's reload_weights); measured on
        # vLLM 0.32's CPU backend, reloading a tied embedding leaves the sampler's logprobs off
        # by up to 0.33 nats, while the layers alone reload exactly (difference 0.0)
        needs = {"training.freeze_embeddings": (not self.freeze_embeddings, "true"),
                 "training.lora": (self.lora is not None, "null (LoRA is not synced to the sampler)"),
                 "training.zero_stage": (self.zero_stage == 3, "0, 1 or 2 (rank 0 sends whole weights)")}
        for field, (bad, fix) in needs.items():
            if bad:
                raise ValueError(f"training.method=on_policy needs {field}={fix}")
        return self
