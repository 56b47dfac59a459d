# Sourced by the bench scripts: `port VAR` sets VAR to a free TCP (and UDP) port. bash cannot
# bind-probe, so ports come from a random range below Linux's ephemeral ports (32768-60999,
# where outgoing connections take theirs), skipping ports something answers on (bash's
# /dev/tcp as the probe).
NEXT_PORT=$((20000 + RANDOM % 10000))
port() {
  while (exec 3<>"/dev/tcp/127.0.0.1/$NEXT_PORT") 2>/dev/null; do NEXT_PORT=$((NEXT_PORT + 1)); done
  printf -v "$1" '%s' "$NEXT_PORT"
  NEXT_PORT=$((NEXT_PORT + 1))
}
