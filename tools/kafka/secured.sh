# Sourced by kafka.sh: the broker's secured client listeners, for the TLS/SASL tests.
#
#   SSL             PORT+2  TLS, server authentication only
#   MTLS            PORT+3  TLS, the client must present a certificate of the test CA
#   SASL_SSL        PORT+4  SCRAM-SHA-512 (and PLAIN) over TLS
#   SASL_PLAINTEXT  PORT+5  PLAIN (and OAUTHBEARER with unsigned test tokens) without TLS
#
# Every secret is made at `up` time and lives under $RUN/secured/ (git-ignored .cache/):
# a throw-away CA, the broker's certificate (for 127.0.0.1 and localhost), a client
# certificate, random passwords. The SCRAM user is written into the metadata log when the
# storage is formatted (KRaft: `format --add-scram`), the PLAIN users are in the listener's
# JAAS config. $RUN/secured.json tells the tests where everything is. `start` (a broker
# resumed on its data) reuses them: the SCRAM credential lives in that data.
#
# KEYBUS_KAFKA_SECURED=0 leaves the secured listeners out; KEYBUS_KAFKA_SECURED_PORT moves
# the first of them (the others follow it).

SECURED="${KEYBUS_KAFKA_SECURED:-1}"
SPORT="${KEYBUS_KAFKA_SECURED_PORT:-$((PORT + 2))}"
SDIR="$RUN/secured"
SJSON="$RUN/secured.json"
SCRAM_USER=svc
PLAIN_USER=svc

secured_on() { [[ "$SECURED" != 0 ]]; }

# Without openssl the broker still serves the plain listener (every other test needs
# it); the secured tests then skip, saying secured.json is missing.
secured_check() {
  if secured_on && ! command -v openssl >/dev/null 2>&1; then
    say "warning: openssl not found: no secured listeners (their tests are skipped)"
    SECURED=0
  fi
}

# Random passwords now (the storage format needs the SCRAM one); the certificates in the
# background, while the storage is formatted (secured_ready waits for them).
secured_make() {
  rm -rf "$SDIR" "$SJSON"
  mkdir -p "$SDIR"
  chmod 700 "$SDIR"
  local who
  for who in scram plain admin; do
    head -c 18 /dev/urandom | base64 | tr '+/' '-_' >"$SDIR/$who.password"
  done
  secured_certificates &
  SCERTS=$!
}

# A throw-away CA signing the broker's and a client's certificate (EC P-256: quick to
# make). Kafka's PEM stores want PKCS#8 keys, which genpkey writes.
secured_certificates() {
  set -e
  cd "$SDIR"
  local ec=(-algorithm EC -pkeyopt ec_paramgen_curve:P-256) who
  openssl genpkey "${ec[@]}" -out ca.key 2>/dev/null
  openssl req -x509 -new -key ca.key -days 2 -subj "/CN=keybus test CA" -out ca.pem 2>/dev/null
  for who in broker client; do
    openssl genpkey "${ec[@]}" -out "$who.key" 2>/dev/null
    openssl req -new -key "$who.key" -subj "/CN=keybus-$who" -out "$who.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$who.ext"
    openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile "$who.ext" -out "$who.pem" 2>/dev/null
  done
  # The broker's PEM key store: its key and certificate in one file.
  cat broker.key broker.pem >broker-store.pem
  rm -f ./*.csr ./*.ext ca.srl
  chmod 600 ./*
}

# Before the broker starts: the certificates are there.
secured_ready() {
  secured_on || return 0
  if [[ -n "${SCERTS:-}" ]]; then
    wait "$SCERTS" || die "making the test certificates in $SDIR failed"
    SCERTS=""
  fi
}

secured_listeners() {
  secured_on || return 0
  printf ',SSL://%s:%s,MTLS://%s:%s,SASL_SSL://%s:%s,SASL_PLAINTEXT://%s:%s' \
    "$HOST" "$SPORT" "$HOST" "$((SPORT + 1))" "$HOST" "$((SPORT + 2))" "$HOST" "$((SPORT + 3))"
}

secured_protocols() {
  secured_on || return 0
  printf ',SSL:SSL,MTLS:SSL,SASL_SSL:SASL_SSL,SASL_PLAINTEXT:SASL_PLAINTEXT'
}

# server.properties lines for the secured listeners (appended by write_config).
secured_config() {
  secured_on || return 0
  local scram plain admin
  scram="$(cat "$SDIR/scram.password")"
  plain="$(cat "$SDIR/plain.password")"
  admin="$(cat "$SDIR/admin.password")"
  local plain_jaas="org.apache.kafka.common.security.plain.PlainLoginModule required username=\"admin\" password=\"$admin\" user_admin=\"$admin\" user_$PLAIN_USER=\"$plain\";"
  cat <<EOF

# Secured client listeners (tools/kafka/secured.sh): PEM stores from a throw-away CA.
ssl.keystore.type=PEM
ssl.keystore.location=$SDIR/broker-store.pem
ssl.truststore.type=PEM
ssl.truststore.location=$SDIR/ca.pem
ssl.client.auth=none
listener.name.mtls.ssl.client.auth=required
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512,PLAIN
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=$plain_jaas
listener.name.sasl_plaintext.sasl.enabled.mechanisms=PLAIN,OAUTHBEARER
listener.name.sasl_plaintext.plain.sasl.jaas.config=$plain_jaas
# Kafka's default OAUTHBEARER validator takes unsigned JWTs (alg none): enough to prove a
# client's token callback is called and its token sent.
listener.name.sasl_plaintext.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required;
EOF
}

# The storage-format arguments that create the SCRAM user in the metadata log.
secured_format_args() {
  secured_on || return 0
  printf -- '--add-scram\nSCRAM-SHA-512=[name=%s,password=%s]\n' "$SCRAM_USER" "$(cat "$SDIR/scram.password")"
}

# What the tests read: the listeners' URLs, the CA and client certificate, the users.
secured_describe() {
  secured_on || return 0
  local tmp="$SJSON.tmp.$$"
  cat >"$tmp" <<EOF
{
  "ssl": "kafka://$HOST:$SPORT",
  "mtls": "kafka://$HOST:$((SPORT + 1))",
  "sasl_ssl": "kafka://$HOST:$((SPORT + 2))",
  "sasl_plaintext": "kafka://$HOST:$((SPORT + 3))",
  "ca_file": "$SDIR/ca.pem",
  "cert_file": "$SDIR/client.pem",
  "key_file": "$SDIR/client.key",
  "scram": {"mechanism": "SCRAM-SHA-512", "username": "$SCRAM_USER", "password": "$(cat "$SDIR/scram.password")"},
  "plain": {"mechanism": "PLAIN", "username": "$PLAIN_USER", "password": "$(cat "$SDIR/plain.password")"}
}
EOF
  chmod 600 "$tmp"
  mv -f "$tmp" "$SJSON"
}

# Wait until every secured port accepts connections (they open with the plain one, but
# the tests should not race them).
secured_wait() {
  secured_on || return 0
  local p deadline=$((SECONDS + 30))
  for p in "$SPORT" "$((SPORT + 1))" "$((SPORT + 2))" "$((SPORT + 3))"; do
    until tcp_open "$p"; do
      ((SECONDS < deadline)) || { say "warning: secured listener $HOST:$p did not open"; return 0; }
      sleep 0.1
    done
  done
}
