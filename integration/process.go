package integration

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Proc is a child process (detour's binary, a CLI, an agent) whose combined output a test reads.
type Proc struct {
	*exec.Cmd
	// Done is closed once the process exited and all its output was read.
	Done chan struct{}

	mu   sync.Mutex
	out  strings.Builder
	more chan struct{}
}

// Start runs cmd; it dies with the test process (Pdeathsig) and is interrupted, then killed after
// 10 s, when the test ends. Its output is logged if the test failed.
func Start(t testing.TB, cmd *exec.Cmd) *Proc {
	t.Helper()
	p := &Proc{Cmd: cmd, Done: make(chan struct{}), more: make(chan struct{}, 1)}
	pr, pw := io.Pipe()
	p.Stdout, p.Stderr = pw, pw
	if p.SysProcAttr == nil {
		p.SysProcAttr = &syscall.SysProcAttr{}
	}
	p.SysProcAttr.Pdeathsig = syscall.SIGKILL
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	read := make(chan struct{})
	go func() {
		defer close(read)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.out.WriteString(sc.Text() + "\n")
			p.mu.Unlock()
			select {
			case p.more <- struct{}{}:
			default:
			}
		}
	}()
	go func() { p.Wait(); pw.Close(); <-read; close(p.Done) }()
	t.Cleanup(func() {
		p.Process.Signal(os.Interrupt)
		select {
		case <-p.Done:
		case <-time.After(10 * time.Second):
			p.Process.Kill()
			<-p.Done
		}
		if t.Failed() {
			t.Logf("%s:\n%s", strings.Join(p.Args, " "), p.Output())
		}
	})
	return p
}

// Output is what the process wrote so far (stdout and stderr).
func (p *Proc) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// WaitFor waits (20 s at most) until the output contains substr.
func (p *Proc) WaitFor(t testing.TB, substr string) {
	t.Helper()
	p.Find(t, regexp.QuoteMeta(substr))
}

// Find waits (20 s at most) until the output matches pattern, and returns its first group (or
// the whole match).
func (p *Proc) Find(t testing.TB, pattern string) string {
	t.Helper()
	re := regexp.MustCompile(pattern)
	deadline := time.After(20 * time.Second)
	for {
		if m := re.FindStringSubmatch(p.Output()); m != nil {
			return m[len(m)-1]
		}
		select {
		case <-p.more:
		case <-p.Done:
			if m := re.FindStringSubmatch(p.Output()); m != nil {
				return m[len(m)-1]
			}
			t.Fatalf("%s exited before its output matched %q:\n%s", strings.Join(p.Args, " "), pattern, p.Output())
		case <-deadline:
			t.Fatalf("no %q from %s after 20 s:\n%s", pattern, strings.Join(p.Args, " "), p.Output())
		}
	}
}

// BuildDetour builds detour's binary from the main module (its go.sum, not this one's) into a new
// temporary directory, for a TestMain: it returns the binary and the function that removes it.
func BuildDetour(name string) (bin string, remove func(), err error) {
	dir, err := os.MkdirTemp("", "detour-"+name+"-")
	if err != nil {
		return "", nil, err
	}
	bin = filepath.Join(dir, "detour")
	build := exec.Command("go", "build", "-o", bin, "./cmd/detour")
	build.Dir = mainModule()
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("building detour: %w", err)
	}
	return bin, func() { os.RemoveAll(dir) }, nil
}

// MainWithDetour is the TestMain of a package whose tests run the detour binary: it builds it
// into *bin, runs setup (if any), runs the tests, removes the binary and exits with the tests'
// code. A failed build or setup exits 1 with its error.
func MainWithDetour(m *testing.M, name string, bin *string, setup func() error) {
	b, remove, err := BuildDetour(name)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	*bin = b
	if setup != nil {
		if err := setup(); err != nil {
			remove()
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	remove()
	os.Exit(code)
}

// mainModule is the directory of detour's main module: this package's parent.
func mainModule() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}
