// natsauth writes the identities the secured test servers use: an NKey user (and a
// stranger's seed the servers do not know), and a decentralised-auth setup — operator,
// system account, a JetStream-enabled account, a user and its .creds file, plus the
// .creds of a user of an account the server never heard of. Every key is new on each
// run: nothing here is a secret worth keeping, and none is ever committed.
//
//	natsauth DIR    writes DIR/{nkey.seed,nkey.pub,stranger.seed,user.creds,
//	                stranger.creds,operator.conf}
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"
)

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "natsauth:", err)
		os.Exit(1)
	}
}

func write(dir, name string, data []byte) {
	check(os.WriteFile(filepath.Join(dir, name), data, 0o600))
}

func keys(create func() (nkeys.KeyPair, error)) (nkeys.KeyPair, string, []byte) {
	kp, err := create()
	check(err)
	pub, err := kp.PublicKey()
	check(err)
	seed, err := kp.Seed()
	check(err)
	return kp, pub, seed
}

// account signs a JetStream-enabled account (no limits) with the operator's key.
func account(operator nkeys.KeyPair, name string, jetstream bool) (nkeys.KeyPair, string, string) {
	kp, pub, _ := keys(nkeys.CreateAccount)
	claims := jwt.NewAccountClaims(pub)
	claims.Name = name
	if jetstream {
		claims.Limits.JetStreamLimits = jwt.JetStreamLimits{
			MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1,
		}
	}
	token, err := claims.Encode(operator)
	check(err)
	return kp, pub, token
}

// creds is a user of the account signed by it, as a .creds file.
func creds(account nkeys.KeyPair, name string) []byte {
	_, pub, seed := keys(nkeys.CreateUser)
	claims := jwt.NewUserClaims(pub)
	claims.Name = name
	token, err := claims.Encode(account)
	check(err)
	file, err := jwt.FormatUserConfig(token, seed)
	check(err)
	return file
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: natsauth DIR")
		os.Exit(2)
	}
	dir := os.Args[1]
	check(os.MkdirAll(dir, 0o700))

	_, nkeyPub, nkeySeed := keys(nkeys.CreateUser)
	write(dir, "nkey.seed", nkeySeed)
	write(dir, "nkey.pub", []byte(nkeyPub))
	_, _, strangerSeed := keys(nkeys.CreateUser)
	write(dir, "stranger.seed", strangerSeed)

	operator, operatorPub, _ := keys(nkeys.CreateOperator)
	_, sysPub, sysJWT := account(operator, "SYS", false)
	keybus, keybusPub, keybusJWT := account(operator, "KEYBUS", true)
	opClaims := jwt.NewOperatorClaims(operatorPub)
	opClaims.Name = "keybus-test"
	opClaims.SystemAccount = sysPub
	opJWT, err := opClaims.Encode(operator)
	check(err)
	write(dir, "user.creds", creds(keybus, "svc"))

	// A well-formed .creds the server must refuse: its account is not the server's.
	stranger, _, _ := keys(nkeys.CreateOperator)
	strangerAccount, _, _ := account(stranger, "STRANGER", true)
	write(dir, "stranger.creds", creds(strangerAccount, "intruder"))

	conf := fmt.Sprintf(
		"operator: %s\nsystem_account: %s\nresolver: MEMORY\nresolver_preload: {\n  %s: %s\n  %s: %s\n}\n",
		opJWT, sysPub, sysPub, sysJWT, keybusPub, keybusJWT,
	)
	write(dir, "operator.conf", []byte(conf))
}
