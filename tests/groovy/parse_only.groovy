// Parse Groovy files to the CONVERSION phase only: syntax errors fail, unknown QuPath classes do not
// (QuPath is not on the classpath here). Usage: groovy parse_only.groovy FILE...
import org.codehaus.groovy.control.CompilationUnit
import org.codehaus.groovy.control.CompilerConfiguration
import org.codehaus.groovy.control.Phases

def failed = 0
args.each { path ->
    def unit = new CompilationUnit(new CompilerConfiguration())
    unit.addSource(new File(path))
    try {
        unit.compile(Phases.CONVERSION)
        println "ok " + path
    } catch (Exception e) {
        failed++
        println "FAIL " + path + "\n" + e.getMessage()
    }
}
System.exit(failed ? 1 : 0)
